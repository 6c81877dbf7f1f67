"""`python -m fishckpt` runs the command line."""

from fishckpt_cli.main import main

main()

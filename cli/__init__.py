"""The fishckpt command line (installed as fishckpt_cli): a thin click layer over the library."""

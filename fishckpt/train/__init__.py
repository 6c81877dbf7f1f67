"""Tools for the training loop: the checkpoint manager and resume."""

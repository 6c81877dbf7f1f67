"""The method: Fisher scores, mask selection, and training under a fixed mask."""

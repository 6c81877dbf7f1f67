"""The on-disk format: what every byte of a store means (docs/format.md). No file-system access lives here."""

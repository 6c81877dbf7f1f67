"""The fishckpt commands, one module per area: store writes, steps, diff, verify, report, masks."""

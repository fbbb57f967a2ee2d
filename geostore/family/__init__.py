"""Task families: what is specific to one task (config, probe, loss, trainable set)."""

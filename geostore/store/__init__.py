"""The Zarr store: its schema (the contract), the crash-safe writer and the read-only reader."""

"""infer layer."""

"""Model architectures of the embedded engine, one file per family."""

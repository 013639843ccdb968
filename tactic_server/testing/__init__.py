"""What tests, benchmarks and load runs build on: tiny random checkpoints (tiny_model)."""

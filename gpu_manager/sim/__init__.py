"""The simulated GPU and its stand-in workloads (for machines without a GPU, and for tests)."""

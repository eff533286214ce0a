"""Model and system benchmarks: latency, a training step, inference and serving."""

"""The device: BLAS binding, latency and memory measurement, the memory model."""

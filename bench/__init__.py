"""Benchmarks, the emulated cluster lab (bench/lab) and the simulator (bench/sim)."""

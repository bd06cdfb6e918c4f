"""Benchmarks of the engine; each module writes JSON + markdown + PNG reports (see ``kernels``)."""

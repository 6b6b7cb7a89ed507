"""Benchmarks: fastpatch against the TransformerLens loop, same model, inputs and machine."""

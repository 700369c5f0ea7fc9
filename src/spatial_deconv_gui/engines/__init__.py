"""Deconvolution engines: pure numerics, no Qt."""

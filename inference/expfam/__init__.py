"""Exponential families in natural-parameter form (priors and local factors of the SVAE)."""

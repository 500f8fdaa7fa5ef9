"""Backends of graphppl: exact message passing, SVAE, SVI and MCMC (``ppl.inference``)."""

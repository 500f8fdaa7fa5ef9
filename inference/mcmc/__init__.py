"""mcmc backend."""

"""Backend "vi": conjugate variational Bayes (coordinate ascent / variational message passing)."""

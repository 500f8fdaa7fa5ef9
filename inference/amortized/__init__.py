"""amortized backend."""

"""svae backend."""

"""svi backend."""

"""graphppl: structured latent-variable models with neural parts (import name ``ppl``)."""

"""Backend "adversarial": implicit (simulator) models fitted with a discriminator as density-ratio estimator."""

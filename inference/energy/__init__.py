"""Backend "energy": energy-based models (restricted Boltzmann machines): CD / PCD training, Gibbs, AIS."""

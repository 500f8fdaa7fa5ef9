"""Exact message passing kernels: HMM (discrete chains) and Kalman (linear-Gaussian chains)."""

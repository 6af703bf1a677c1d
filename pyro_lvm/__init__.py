"""pyro-lvm: latent-variable models in Pyro with swappable variational families."""

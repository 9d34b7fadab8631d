"""Training chain: the toy world now; collection, SAE training, importance and export later."""

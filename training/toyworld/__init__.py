"""The toy world: a small SD-architecture pipeline trained on synthetic labelled shapes."""

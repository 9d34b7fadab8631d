"""sae-steering core: TopK SAE, UNet hooks, steered pipeline and the steering-bundle format.

This package imports neither ``training`` nor ``service``; both build on it.
"""

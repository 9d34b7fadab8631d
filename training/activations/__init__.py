"""Activation collection for SAE training: prompt files, the on-disk store, `steer collect`,
the online pipeline source and the loader."""

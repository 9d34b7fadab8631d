"""Steering quality evaluation on the toy world: metrics first."""

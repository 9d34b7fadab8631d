"""Steering quality evaluation on the toy world (the evaluation issue): metrics first."""

"""Steering recipes, one module each, looked up by name (:func:`get`): ``plain`` (masked
multiplicative edit and amplification), ``replace`` and ``translate`` (learned swaps)."""

from steering.recipes import plain, replace, translate
from steering.recipes.base import RecipeRows, RowPart, get, names, register

__all__ = ["RecipeRows", "RowPart", "get", "names", "plain", "register", "replace",
           "translate"]

"""The registry of steering recipes: each recipe module registers how it turns a suppression
into the parts of a table row, and :class:`steering.plan.SteeringPlan` looks it up by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

from torch import Tensor

from steering.recipe import RECIPE_NAMES

if TYPE_CHECKING:
    from steering.plan import SteeringPlan


class RowPart(Protocol):
    """A built edit of one row: the change of each token's activation from its top-k code."""

    def delta(self, values: Tensor, indices: Tensor) -> Tensor:
        """[T, k] codes -> [T, d_in] change of the activations."""
        ...


class RecipeRows(ABC):
    """How one recipe builds the part of a row that suppresses one edit's concept."""

    name: ClassVar[str]

    @abstractmethod
    def suppress(self, plan: SteeringPlan, i: int, r: int, gate: int | None) -> RowPart | None:
        """Edit i's suppression part at row r (from the plan's cache), or None to fold it
        into the row's ungated plain edit."""


_REGISTRY: dict[str, RecipeRows] = {}
_R = TypeVar("_R", bound=type[RecipeRows])


def register(cls: _R) -> _R:
    """Class decorator: make the recipe ``cls.name`` available to :func:`get`."""
    if cls.name not in RECIPE_NAMES:
        raise ValueError(f"recipe {cls.name!r} is not in steering.recipe.RECIPE_NAMES "
                         f"({', '.join(RECIPE_NAMES)}); add it there first")
    _REGISTRY[cls.name] = cls()
    return cls


def get(name: str) -> RecipeRows:
    """The registered recipe ``name``; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"no row builder for steering recipe {name!r}; registered: "
                         f"{', '.join(sorted(_REGISTRY))}") from None


def names() -> list[str]:
    """Names of the registered recipes."""
    return sorted(_REGISTRY)

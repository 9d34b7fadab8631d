"""Order a request's edits into stages when one suppression's swap leads to another.

A learned swap turns its concept into an anchor (red → green). When the request also removes
the anchor (red and green), the anchor's own edit has to see what the first swap made, so it
runs in a later stage, whose gate reads the activations the earlier stage produced
(steering/hooks.py: each stage encodes its input again). Chains get one stage per link
(red → green → blue: red first, then green). A cycle (blue ⇄ green: each swaps into the other)
has no order that removes both, so it is refused with an error naming it.

A content policy's always-on suppressions (``final`` edits) stay after every request edit
(the policy holds on the final activations); a request suppression that a policy swap leads to
(the policy removes red towards green, the request removes green) is applied once more after
them. Each extra stage costs one more SAE encode of the block's output per step, and only
requests with such chains pay it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from steering.edits import Direction, EditError, ResolvedEdit, suppressed_names


def check_swap_cycles(suppressed: Sequence[str], anchors: Mapping[str, str]) -> None:
    """Raise EditError naming a cycle of suppressed concepts whose swaps lead into each
    other (nothing would be left to swap to)."""
    gone = set(suppressed)
    for start in suppressed:
        path, c = [start], anchors.get(start)
        while c is not None and c in gone:
            if c in path:
                cycle = [*path[path.index(c):], c]
                raise EditError("concepts", "the learned swaps of "
                                + " → ".join(cycle) + " lead into each other, so suppressing "
                                "all of them leaves each to be swapped back: keep one of them, "
                                "or refit one's counterfactual (`steer bundle tune`)")
            path.append(c)
            c = anchors.get(c)


def _levels(edits: Sequence[ResolvedEdit], anchors: Mapping[str, str]) -> list[list[ResolvedEdit]]:
    """Split one group of edits (acyclic) into stages: a suppression whose concept is the
    anchor of another suppression of the group comes after it."""
    names = set(suppressed_names(edits))
    feeds: dict[str, list[str]] = {}
    for c in names:
        a = anchors.get(c)
        if a is not None and a in names:
            feeds.setdefault(a, []).append(c)
    depth: dict[str, int] = {}

    def level(c: str) -> int:
        if c not in depth:
            depth[c] = 1 + max((level(p) for p in feeds.get(c, ())), default=-1)
        return depth[c]

    stages: list[list[ResolvedEdit]] = []
    for e in edits:
        at = level(e.spec.name) if e.spec.name in names else 0
        while len(stages) <= at:
            stages.append([])
        stages[at].append(e)
    return stages


def edit_stages(edits: Sequence[ResolvedEdit], anchors: Mapping[str, str]
                ) -> list[list[ResolvedEdit]]:
    """The request's edits in the order their stages run: the request's own edits (by swap
    chain), the final ones (by swap chain), then request suppressions that a final swap leads
    to, once more. Raises EditError for a cycle of swaps among the suppressed concepts."""
    check_swap_cycles(suppressed_names(edits), anchors)
    request = [e for e in edits if not e.final]
    final = [e for e in edits if e.final]
    stages = _levels(request, anchors) + _levels(final, anchors)
    made_by_final = {anchors.get(c) for c in suppressed_names(final)}
    again = [e for e in request if e.active and e.direction is Direction.SUPPRESS
             and e.spec.name in made_by_final]
    if again:
        stages.append(again)
    return [s for s in stages if s] or [[]]

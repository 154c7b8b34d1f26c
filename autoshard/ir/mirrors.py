"""Rows of a plan's tables that only mirror a parameter's layout.

An optimizer's moments (``optimizer['opt_state'][0]['mu']['blocks'][0]['up']['kernel']``) and
the step's new parameters (``out[0]['blocks'][0]['up']['kernel']``) are laid out as the
parameter they belong to (``model['blocks'][0]['up']['kernel']``) in nearly every plan; listing
each one again triples a summary without saying anything new. Summaries list the parameter and
count the rows that mirror it.
"""

from __future__ import annotations

import re
from typing import Hashable, Sequence

_ARGUMENT_NAME = re.compile(r"[^\[.]*")


def below_argument(path: str) -> str:
    """``path`` without its argument's name: ``['w']`` of ``params['w']``."""
    return path[_ARGUMENT_NAME.match(path).end():]


def mirror_rows(rows: Sequence[tuple[str, Hashable]],
                earlier: Sequence[tuple[str, Hashable]] = ()) -> set[int]:
    """Indices of the ``rows`` (path, layout) that mirror another row: one of ``rows`` or
    ``earlier`` with the same layout (shape and spec, say) whose path below its argument name
    is a tail of this row's path, this row's going deeper (``out[0]['w']`` and
    ``opt_state[0].mu['w']`` mirror ``params['w']``; ``batch['w']`` does not)."""
    primary: dict[str, list[Hashable]] = {}
    for path, layout in earlier:
        primary.setdefault(below_argument(path), []).append(layout)
    mirrored = set()
    for i in sorted(range(len(rows)), key=lambda i: len(rows[i][0])):
        path, layout = rows[i]
        below = below_argument(path)
        start = len(path) - len(below)
        # every tail of the path deeper than its own that starts a key: ['up']['kernel'], ...
        tails = (path[k:] for k in range(start + 1, len(path)) if path[k] in "[.")
        if any(layout in primary.get(tail, ()) for tail in tails):
            mirrored.add(i)
        elif below:
            primary.setdefault(below, []).append(layout)
    return mirrored

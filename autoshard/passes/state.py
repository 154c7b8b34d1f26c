"""Which results of a step are the new values of which arguments (parameters, optimizer state).

A train step returns its state updated; a plan that lays out ``out[0]['w']`` differently from
``params['w']`` pays a reshard on every step (or fails to donate). Results are matched to
arguments by path below the argument name / result index, shape and dtype: ``out[0]['w']`` and
``params['w']``, ``out[1][0].mu['w']`` and ``opt_state[0].mu['w']``.
"""

from __future__ import annotations

import re

from autoshard.ir.graph import Graph

_ARG_NAME = re.compile(r"^(?:args\[\d+\]|[A-Za-z_]\w*)")
_TUPLE_INDEX = re.compile(r"^\[\d+\]")


def updated_arguments(graph: Graph) -> dict[int, int]:
    """Result position -> argument position, for results that are an argument's new value:
    the same path below the argument name / result index, the same shape and dtype."""
    by_path: dict[tuple, list[int]] = {}
    for i, v in enumerate(graph.inputs):
        rest = _ARG_NAME.sub("", v.name, count=1)
        by_path.setdefault((rest, v.shape, str(v.dtype)), []).append(i)
    matches = {}
    for i, (atom, name) in enumerate(zip(graph.outputs, graph.output_names)):
        rest = name[len("out"):]
        for candidate in (_TUPLE_INDEX.sub("", rest, count=1), rest):
            found = by_path.get((candidate, atom.shape, str(atom.dtype)), [])
            if len(found) == 1 and rest:
                matches[i] = found[0]
                break
    return matches

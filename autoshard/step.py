"""``Step``: what every ``autoshard.compile`` result offers, whichever front end built it.

``ShardedFunction`` (a planned function of arrays), ``NnxFunction`` (a step over Flax NNX
objects) and ``PipelinedFunction`` (a pipelined loss) each add their own extras; code that
takes any of them (benchmarks, examples, ``autoshard.dump``) needs only these four members.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

from autoshard.ir.pipeline import PipelinePlan
from autoshard.ir.plan import Plan


@runtime_checkable
class Step(Protocol):
    """A compiled step: called like ``jax.jit``'s result, lowered like it, and described by its
    plan (a ``PipelinePlan`` for a pipelined step)."""

    def __call__(self, *args: Any) -> Any: ...

    def lower(self, *args: Any) -> jax.stages.Lowered: ...

    @property
    def plan(self) -> Plan | PipelinePlan: ...

    def summary(self) -> str: ...

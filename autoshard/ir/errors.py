"""Typed errors raised by autoshard.

Each error names the user's object (argument path, value, primitive, mesh axis, source line) and
says what to do about it; callers build the message, these classes only give it a type that a
user can catch. Every error is also a ``ValueError`` or ``TypeError`` where Python convention
expects one, so generic handlers keep working.
"""

from __future__ import annotations


class AutoshardError(Exception):
    """Base class of every error autoshard raises on purpose."""


class ShardingError(AutoshardError, ValueError):
    """A sharding spec that cannot apply: an unknown mesh axis, a dimension a mesh axis does not
    divide, a split of a scanned-over axis, an axis used twice."""


class UnsupportedPrimitiveError(AutoshardError, NotImplementedError):
    """A primitive in the user's function that autoshard cannot lift or lower."""


class ArgumentError(AutoshardError, TypeError):
    """An argument autoshard cannot trace (not an array, or not what the function was planned for)."""


class PlanError(AutoshardError, ValueError):
    """A plan that does not fit the graph it is applied to (missing inputs, wrong value ids)."""


class PlanInfeasibleError(AutoshardError, ValueError):
    """No plan satisfies the constraints (memory budget, pins)."""


class PlanAgreementError(PlanError):
    """The processes of a multi-process run did not agree on a plan: another process failed to
    plan, did not report in time, or chose a different plan."""


class SolverTimeLimitWarning(UserWarning):
    """The solver reached ``solver_time_limit`` before proving its plan optimal; the plan is the
    best one found, and the warning states its gap to the lower bound."""

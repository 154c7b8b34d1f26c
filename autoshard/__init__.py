"""autoshard: automatic sharding plans for JAX programs.

``autoshard.compile(step, *example_args, mesh=mesh)`` traces ``step``, lifts it into a graph,
chooses a plan (a layout for every argument and result, and pins on intermediates) and returns a
``ShardedFunction`` that runs like ``jax.jit(step)``, sharded over ``mesh``.
"""

from autoshard.api import ShardedFunction, compile
from autoshard.ir.errors import (ArgumentError, AutoshardError, PlanError, PlanInfeasibleError,
                                 ShardingError, UnsupportedPrimitiveError)
from autoshard.ir.hint import hint
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.plan import Plan
from autoshard.ir.sharding import PARTIAL, B, S, ShardingSpec

__version__ = "0.1.0"

__all__ = [
    "ArgumentError", "AutoshardError", "B", "MeshSpec", "PARTIAL", "Plan", "PlanError",
    "PlanInfeasibleError", "S", "ShardedFunction", "ShardingError", "ShardingSpec",
    "UnsupportedPrimitiveError", "compile", "hint", "__version__",
]

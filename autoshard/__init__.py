"""autoshard: automatic sharding plans for JAX programs.

``autoshard.compile(step, *example_args, mesh=mesh)`` traces ``step``, lifts it into a graph,
chooses a plan (a layout for every argument and result, and pins on intermediates) and returns a
``ShardedFunction`` that runs like ``jax.jit(step)``, sharded over ``mesh``.
"""

from autoshard.api import ShardedFunction, compile
from autoshard.cost_model.hardware import PROFILES, Hardware, Link
from autoshard.ir.errors import (ArgumentError, AutoshardError, PlanError, PlanInfeasibleError,
                                 ShardingError, UnsupportedPrimitiveError)
from autoshard.ir.hint import hint
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.plan import Plan, Prediction, SolverStats
from autoshard.ir.sharding import PARTIAL, B, S, ShardingSpec
from autoshard.verify import Verification, verify

__version__ = "0.1.0"

__all__ = [
    "ArgumentError", "AutoshardError", "B", "Hardware", "Link", "MeshSpec", "PARTIAL", "PROFILES",
    "Plan", "PlanError", "PlanInfeasibleError", "Prediction", "S", "ShardedFunction",
    "ShardingError", "ShardingSpec", "SolverStats", "UnsupportedPrimitiveError", "Verification",
    "compile", "hint", "verify", "__version__",
]

"""autoshard: automatic sharding plans for JAX programs.

``autoshard.compile(step, *example_args, mesh=mesh)`` traces ``step``, lifts it into a graph,
chooses a plan (a layout for every argument and result, and pins on intermediates) and returns a
``ShardedFunction`` that runs like ``jax.jit(step)``, sharded over ``mesh``.
"""

from autoshard.api import ShardedFunction, compile, shard_batch
from autoshard.cost_model.hardware import PROFILES, Hardware, Link
from autoshard.dump import PlanDump, dump, load_plan
from autoshard.ir.errors import (ArgumentError, AutoshardError, PlanError, PlanInfeasibleError,
                                 PlanAgreementError, ShardingError, SolverTimeLimitWarning,
                                 UnsupportedPrimitiveError)
from autoshard.ir.hint import hint
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.pipeline import AutoDecision, Pipeline, PipelinePlan
from autoshard.ir.plan import AnnotationDiff, AnnotationReport, Plan, Prediction, SolverStats
from autoshard.ir.sharding import PARTIAL, B, S, ShardingSpec
from autoshard.ir.version import __version__
from autoshard.pipelining import PipelinedFunction, PipelineRoofline, grad, value_and_grad
from autoshard.nnx import NnxFunction
from autoshard.verify import Verification, verify

__all__ = [
    "AutoDecision",
    "AnnotationDiff", "AnnotationReport", "NnxFunction",
    "ArgumentError", "AutoshardError", "B", "Hardware", "Link", "MeshSpec", "PARTIAL",
    "PROFILES", "Pipeline", "PipelinePlan", "PipelineRoofline", "PipelinedFunction", "Plan", "PlanAgreementError", "PlanDump", "PlanError", "PlanInfeasibleError",
    "Prediction", "S", "ShardedFunction", "ShardingError", "ShardingSpec", "SolverStats",
    "SolverTimeLimitWarning", "UnsupportedPrimitiveError", "Verification", "compile", "dump", "grad",
    "hint", "load_plan", "shard_batch", "value_and_grad", "verify", "__version__",
]

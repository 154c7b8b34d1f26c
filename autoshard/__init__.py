"""autoshard: automatic sharding plans for JAX programs.

``autoshard.compile(step, *example_args, mesh=mesh)`` traces ``step``, lifts it into a graph,
chooses a plan (a layout for every argument and result, and pins on intermediates) and returns a
``ShardedFunction`` that runs like ``jax.jit(step)``, sharded over ``mesh``.
"""

from autoshard.api import compile, shard_batch
from autoshard.cost_model.hardware import PROFILES, Hardware, Link
from autoshard.dump import PlanDump, dump, load_plan
from autoshard.ir.errors import (ArgumentError, AutoshardError, PlanError, PlanInfeasibleError,
                                 PlanAgreementError, ShardingError, SolverTimeLimitWarning,
                                 UnsupportedPrimitiveError)
from autoshard.ir.hint import hint
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.pipeline import AutoDecision, Pipeline, PipelinePlan
from autoshard.ir.plan import (AnnotationDiff, AnnotationReport, Plan, PlanCandidate, Prediction,
                               SolverStats)
from autoshard.ir.sharding import PARTIAL, B, S, ShardingSpec
from autoshard.ir.version import __version__
from autoshard.gradients import grad, value_and_grad
from autoshard.pipelined_function import PipelinedFunction, PipelineRoofline
from autoshard.nnx import NnxFunction
from autoshard.sharded_function import ShardedFunction
from autoshard.step import Step
from autoshard.measure.verify import Verification, verify

__all__ = [
    "AnnotationDiff", "AnnotationReport", "ArgumentError", "AutoDecision", "AutoshardError",
    "B", "compile", "dump", "grad", "Hardware", "hint", "Link", "load_plan", "MeshSpec",
    "NnxFunction", "PARTIAL", "Pipeline", "PipelinedFunction", "PipelinePlan",
    "PipelineRoofline", "Plan", "PlanAgreementError", "PlanCandidate", "PlanDump", "PlanError",
    "PlanInfeasibleError", "Prediction", "PROFILES", "S", "shard_batch", "ShardedFunction",
    "ShardingError", "ShardingSpec", "SolverStats", "SolverTimeLimitWarning", "Step",
    "UnsupportedPrimitiveError", "value_and_grad", "Verification", "verify", "__version__",
]

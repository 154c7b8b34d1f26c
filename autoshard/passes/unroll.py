"""Unroll scanned layer stacks so that a pipeline can cut between their layers.

A ``lax.scan`` over stacked layer parameters is one op in the lifted graph, so the stage slicer
(passes/stages.py) could only place it whole in one chunk. This pass re-traces a closed jaxpr
with every top-level scan whose stacked operands (``xs``) include a differentiated parameter
replaced by its iterations, one after the other: iteration ``i`` runs the body on slice ``i``
of each ``xs`` and the carry, and the per-iteration results are stacked back. The body keeps
its own structure (a ``jax.checkpoint`` inside stays a checkpoint). Other scans (a loop over
time steps, say) and scans longer than ``MAX_UNROLLED`` stay whole.

It is JAX's evaluate-and-retrace interpreter pattern (the "Writing custom Jaxpr interpreters"
guide): every other equation is re-bound as it was.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core

#: Scans longer than this stay whole (unrolling them would grow the graph past use).
MAX_UNROLLED = 128


def unroll_layer_scans(closed: Any, param_positions: Sequence[int]) -> Any:
    """``closed`` (a ClosedJaxpr) with its scans over the parameters at invar positions
    ``param_positions`` unrolled; the same function, traced again."""
    jaxpr = closed.jaxpr
    params = {jaxpr.invars[i] for i in param_positions}
    if not any(_is_layer_scan(e, params) for e in jaxpr.eqns):
        return closed
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in jaxpr.invars]

    def run(*args):
        return _evaluate(jaxpr, closed.consts, args, params)

    return jax.make_jaxpr(run)(*avals)


def _is_layer_scan(eqn, params: set) -> bool:
    if eqn.primitive.name != "scan" or eqn.params["length"] > MAX_UNROLLED:
        return False
    first_x = eqn.params["num_consts"] + eqn.params["num_carry"]
    return any(isinstance(v, core.Var) and v in params for v in eqn.invars[first_x:])


def _evaluate(jaxpr, consts, args, params: set) -> list:
    env: dict = {}

    def read(atom):
        return atom.val if isinstance(atom, core.Literal) else env[atom]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        ins = [read(a) for a in eqn.invars]
        if _is_layer_scan(eqn, params):
            outs = _unrolled_scan(eqn, ins)
        else:
            outs = eqn.primitive.bind(*ins, **eqn.params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for var, value in zip(eqn.outvars, outs):
            env[var] = value
    return [read(a) for a in jaxpr.outvars]


def _unrolled_scan(eqn, ins: list) -> list:
    p = eqn.params
    body = p["jaxpr"]
    nconst, ncarry, length = p["num_consts"], p["num_carry"], p["length"]
    consts, carry, xs = ins[:nconst], list(ins[nconst:nconst + ncarry]), ins[nconst + ncarry:]
    steps = range(length - 1, -1, -1) if p["reverse"] else range(length)
    ys_by_step = {}
    for i in steps:
        x_i = [lax.index_in_dim(x, i, keepdims=False) for x in xs]
        outs = core.jaxpr_as_fun(body)(*consts, *carry, *x_i)
        carry, ys_by_step[i] = list(outs[:ncarry]), outs[ncarry:]
    ys = [jnp.stack([ys_by_step[i][k] for i in range(length)])
          for k in range(len(eqn.outvars) - ncarry)]
    return [*carry, *ys]

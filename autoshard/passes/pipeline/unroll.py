"""Unroll scanned layer stacks so that a pipeline can cut between their layers.

A ``lax.scan`` over stacked layer parameters is one op in the lifted graph, so the stage slicer
(passes/pipeline/stages.py) could only place it whole in one chunk. This pass re-traces a closed jaxpr
with every top-level scan whose stacked operands (``xs``) include a differentiated parameter
replaced by its iterations, one after the other: iteration ``i`` runs the body on slice ``i``
of each ``xs`` and the carry, and the per-iteration results are stacked back. The body keeps
its own structure (a ``jax.checkpoint`` inside stays a checkpoint). Other scans (a loop over
time steps, say) and scans longer than ``MAX_UNROLLED`` stay whole. A stacked parameter that
only such scans read is passed as its layers, one invar each (``split_layer_params``).

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


def split_layer_params(closed: Any, param_positions: Sequence[int]
                       ) -> tuple[Any, tuple[tuple[int, int | None], ...]]:
    """``closed`` with its layer scans unrolled *and* every stacked parameter that only such
    scans read split into one invar per layer, so that a pipeline chunk holding some layers
    holds (and exchanges the gradients of) those layers only, not the whole stack.

    Returns the new ClosedJaxpr, whose leading invars are the parameters (a split one as its
    layers in order, in its place) followed by the other invars, and for each new parameter
    invar ``(position in param_positions, layer)``, ``layer`` None where it stays whole."""
    jaxpr = closed.jaxpr
    positions = list(param_positions)
    params = {jaxpr.invars[i] for i in positions}
    layers = _stacked_layer_params(jaxpr, params)
    expansion = tuple((k, layer) for k, i in enumerate(positions)
                      for layer in (range(layers[jaxpr.invars[i]])
                                    if jaxpr.invars[i] in layers else [None]))
    if not any(_is_layer_scan(e, params) for e in jaxpr.eqns):
        return closed, expansion
    others = [i for i in range(len(jaxpr.invars)) if i not in positions]
    avals = []
    for k, layer in expansion:
        aval = jaxpr.invars[positions[k]].aval
        shape = aval.shape if layer is None else aval.shape[1:]
        avals.append(jax.ShapeDtypeStruct(shape, aval.dtype))
    avals += [jax.ShapeDtypeStruct(jaxpr.invars[i].aval.shape, jaxpr.invars[i].aval.dtype)
              for i in others]

    def run(*args):
        values = dict(zip(others, args[len(expansion):]))
        for (k, layer), value in zip(expansion, args):
            if layer is None:
                values[positions[k]] = value
            else:
                values.setdefault(positions[k], _Layers()).append(value)
        return _evaluate(jaxpr, closed.consts, [values[i] for i in range(len(jaxpr.invars))],
                         params)

    return jax.make_jaxpr(run)(*avals), expansion


class _Layers(list):
    """A stacked parameter passed as its layers (split_layer_params): only layer scans read
    it, iteration ``i`` its layer ``i``."""


def _stacked_layer_params(jaxpr, params: set) -> dict:
    """The parameters every top-level use of which is as a stacked operand (``xs``) of a layer
    scan, with the scan's length (a parameter read by anything else stays whole)."""
    found: dict = {}
    other: set = set()
    for eqn in jaxpr.eqns:
        first_x = (eqn.params["num_consts"] + eqn.params["num_carry"]
                   if _is_layer_scan(eqn, params) else len(eqn.invars))
        for k, v in enumerate(eqn.invars):
            if not isinstance(v, core.Var) or v not in params:
                continue
            if k >= first_x:
                found[v] = eqn.params["length"]
            else:
                other.add(v)
    other |= {v for v in jaxpr.outvars if isinstance(v, core.Var)}
    return {v: n for v, n in found.items() if v not in other}


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
        x_i = [x[i] if isinstance(x, _Layers) else lax.index_in_dim(x, i, keepdims=False)
               for x in xs]
        outs = core.jaxpr_as_fun(body)(*consts, *carry, *x_i)
        carry, ys_by_step[i] = list(outs[:ncarry]), outs[ncarry:]
    ys = [jnp.stack([ys_by_step[i][k] for i in range(length)])
          for k in range(len(eqn.outvars) - ncarry)]
    return [*carry, *ys]

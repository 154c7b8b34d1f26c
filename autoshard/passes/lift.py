"""Lift a closed jaxpr into the graph IR.

Calls are inlined (``jit``/``pjit``, ``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``,
``remat``): the planner wants one flat dataflow graph, and a train step has already been
differentiated, so the custom derivative rules have done their work. Inlining ``remat`` would
let XLA's CSE merge the recomputation back into the forward pass; JAX's own lowering prevents
that with an optimization barrier on the recomputation's inputs, and so do we.

Loops and conditionals stay region nodes with body graphs (``scan``, ``while``, ``cond``): a
body is planned once, and a scan's stacked operands are stacked along their leading axis, which
a plan may never split.

User pins become ``autoshard_hint`` nodes: ``autoshard.hint`` directly,
``with_sharding_constraint`` / ``device_put`` to a ``NamedSharding`` written inside the
function, and explicit-mode layouts (``out_sharding=`` params, ``jax.sharding.reshard``; see
passes/explicit.py), which are dropped from the params so the node re-binds on any mesh.
Other primitives are kept as they are and re-bound as they are, sub-jaxprs included (scatter
combiners, ``custom_linear_solve``): the planner may treat them as opaque. Only
primitives that fix their own per-device layout (``shard_map``, ``pmap``) cannot live inside a
planned program; they raise UnsupportedPrimitiveError at the user's source line.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
from jax._src import source_info_util
from jax.extend import core as jcore
from jax.sharding import NamedSharding, PartitionSpec

from autoshard.ir.errors import UnsupportedPrimitiveError
from autoshard.ir.graph import Graph, Literal, Node, Value
from autoshard.ir.hint import hint_p
from autoshard.passes.explicit import RESHARD, RESHARD_PARAM, explicit_layout, pinned_spec
from autoshard.passes.trace import TracedFunction, short_path

# primitive name -> the param holding the body that is inlined
_INLINE_BODY = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}
# primitive name -> params holding region bodies (kept as nested graphs)
_REGION_BODIES = {
    "scan": ("jaxpr",),
    "while": ("cond_jaxpr", "body_jaxpr"),
    "cond": ("branches",),
}
# primitives that cannot be re-bound inside a planned program, with what the user can do
_UNSUPPORTED = {
    "shard_map": "it fixes its own per-device layout on a mesh of its own (jax.pmap is built on "
                 "it too). Call the shard_map outside the compiled function, or write its body "
                 "as ordinary jax.numpy code and pin layouts with autoshard.hint(x, spec).",
    "xla_pmap": "pmap is per-device programming; use jax.numpy code and let autoshard shard it.",
}

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
source_info_util.register_exclusion(_PACKAGE_DIR)


def lift(traced: TracedFunction) -> Graph:
    """The graph of a traced function, with argument and result names attached."""
    lifter = _Lifter()
    return lifter.lift_closed(traced.jaxpr, prefix="", input_names=traced.arg_names,
                              output_names=traced.out_names)


def lift_jaxpr(closed_jaxpr: Any) -> Graph:
    """The graph of a bare closed jaxpr (tests, tools)."""
    return _Lifter().lift_closed(closed_jaxpr, prefix="")


class _Builder:
    """The graph under construction: nodes and closed-over constants found while inlining."""

    def __init__(self):
        self.nodes: list[Node] = []
        self.constants: dict[int, Any] = {}
        self.constant_values: list[Value] = []


class _Lifter:
    def __init__(self):
        self._next_value = 0
        self._next_node = 0
        self._enclosing_sources: list[str] = []

    def source(self, eqn) -> str:
        """The user's line for ``eqn``; for library code traced once and cached (jax.random's
        inner jits, pmap's body), whose frames are all inside libraries, the line of the
        enclosing call that the user wrote."""
        own = _user_source(eqn)
        if own or not self._enclosing_sources:
            return own
        return self._enclosing_sources[-1]

    def within(self, eqn, lift_body):
        self._enclosing_sources.append(self.source(eqn))
        try:
            return lift_body()
        finally:
            self._enclosing_sources.pop()

    def new_value(self, aval: Any, name: str = "") -> Value:
        self._next_value += 1
        return Value(self._next_value, tuple(int(d) for d in aval.shape), aval.dtype,
                     bool(getattr(aval, "weak_type", False)), name)

    def emit(self, builder: _Builder, primitive, params, inputs, out_avals, eqn, stack,
             regions=()) -> list[Value]:
        outs = [self.new_value(a) for a in out_avals]
        self._next_node += 1
        builder.nodes.append(Node(self._next_node, primitive, dict(params), tuple(inputs),
                                  tuple(outs), stack, self.source(eqn), tuple(regions)))
        return outs

    def lift_closed(self, closed: Any, *, prefix: str, input_names=(), output_names=()) -> Graph:
        jaxpr, consts = _open(closed)
        builder = _Builder()
        names = list(input_names) or [""] * len(jaxpr.invars)
        inputs = [self.new_value(v.aval, n) for v, n in zip(jaxpr.invars, names)]
        env: dict[Any, Value | Literal] = dict(zip(jaxpr.invars, inputs))
        self.bind_constants(builder, env, jaxpr.constvars, consts)
        self.lift_eqns(builder, env, jaxpr.eqns, prefix)
        outputs = [_read(env, a) for a in jaxpr.outvars]
        return Graph(tuple(inputs), tuple(outputs), tuple(builder.nodes), builder.constants,
                     tuple(builder.constant_values), tuple(output_names))

    def bind_constants(self, builder: _Builder, env: dict, constvars, consts) -> None:
        for var, data in zip(constvars, consts):
            value = self.new_value(var.aval)
            builder.constant_values.append(value)
            builder.constants[value.id] = data
            env[var] = value

    def lift_eqns(self, builder: _Builder, env: dict, eqns, prefix: str) -> None:
        for eqn in eqns:
            name = eqn.primitive.name
            stack = _join(prefix, str(eqn.source_info.name_stack))
            inputs = [_read(env, a) for a in eqn.invars]
            if name in _INLINE_BODY:
                outs = self.inline(builder, eqn, inputs, stack)
            elif name in _REGION_BODIES:
                outs = self.region(eqn, inputs, stack, builder)
            elif name == "sharding_constraint":
                outs = self.pin(builder, eqn, inputs, [eqn.params["sharding"]], stack)
            elif name == "device_put":
                outs = self.pin(builder, eqn, inputs, list(eqn.params["devices"]), stack)
            elif name == RESHARD:
                outs = self.explicit_pin(builder, eqn, inputs,
                                         pinned_spec(eqn.params[RESHARD_PARAM]), stack)
            else:
                _reject_unsupported(eqn, stack, self.source(eqn))
                params, spec = explicit_layout(eqn.params)
                outs = self.emit(builder, eqn.primitive, params, inputs,
                                 [v.aval for v in eqn.outvars], eqn, stack)
                outs = self.explicit_pin(builder, eqn, outs, spec, stack)
            for var, value in zip(eqn.outvars, outs, strict=True):
                env[var] = value

    def inline(self, builder: _Builder, eqn, inputs: list, stack: str) -> list:
        jaxpr, consts = _open(eqn.params[_INLINE_BODY[eqn.primitive.name]])
        label = eqn.params.get("name") or ("checkpoint" if "remat" in eqn.primitive.name
                                           or eqn.primitive.name == "checkpoint"
                                           else eqn.primitive.name)
        inner_prefix = _join(stack, str(label))
        if eqn.primitive.name in ("remat2", "checkpoint"):
            inputs = self.remat_barrier(builder, eqn, inputs, inner_prefix)
        env: dict[Any, Value | Literal] = dict(zip(jaxpr.invars, inputs, strict=True))
        self.bind_constants(builder, env, jaxpr.constvars, consts)
        self.within(eqn, lambda: self.lift_eqns(builder, env, jaxpr.eqns, inner_prefix))
        return [_read(env, a) for a in jaxpr.outvars]

    def remat_barrier(self, builder: _Builder, eqn, inputs: list, stack: str) -> list:
        """The optimization barrier JAX's remat lowering puts on a recomputation's inputs."""
        prevent = eqn.params.get("prevent_cse", True)
        if not eqn.params.get("differentiated", False):
            return inputs
        flags = (prevent,) * len(inputs) if isinstance(prevent, bool) else tuple(prevent)
        picked = [i for i, (f, a) in enumerate(zip(flags, inputs))
                  if f and isinstance(a, Value)]
        if not picked:
            return inputs
        barrier_ins = [inputs[i] for i in picked]
        outs = self.emit(builder, _optimization_barrier_p(), {}, barrier_ins,
                         [_aval_of(a) for a in barrier_ins], eqn, stack)
        inputs = list(inputs)
        for i, v in zip(picked, outs):
            inputs[i] = v
        return inputs

    def region(self, eqn, inputs: list, stack: str, builder: _Builder) -> list:
        name = eqn.primitive.name
        bodies = []
        for param in _REGION_BODIES[name]:
            body = eqn.params[param]
            for closed in (body if isinstance(body, (tuple, list)) else (body,)):
                bodies.append(self.within(eqn, lambda c=closed: self.lift_closed(
                    c, prefix=_join(stack, name))))
        params = {k: v for k, v in eqn.params.items() if k not in _REGION_BODIES[name]}
        return self.emit(builder, eqn.primitive, params, inputs, [v.aval for v in eqn.outvars],
                         eqn, stack, bodies)

    def explicit_pin(self, builder: _Builder, eqn, values: list, spec, stack: str) -> list:
        """An explicit-mode layout (passes/explicit.py) as a hint on ``values``; None: as
        they are."""
        if spec is None:
            return values
        return [self.emit(builder, hint_p, {"spec": spec}, [v], [_aval_of(v)], eqn, stack)[0]
                if isinstance(v, Value) else v for v in values]

    def pin(self, builder: _Builder, eqn, inputs: list, shardings: list, stack: str) -> list:
        """Turn a user's sharding constraint into hints; unpinnable ones become the identity."""
        if len(shardings) == 1 and len(inputs) > 1:
            shardings = shardings * len(inputs)
        outs = []
        for atom, sharding in zip(inputs, shardings, strict=True):
            spec = getattr(sharding, "spec", None)
            if (isinstance(sharding, NamedSharding) and isinstance(atom, Value)
                    and not any(e is PartitionSpec.UNCONSTRAINED for e in spec)):
                (out,) = self.emit(builder, hint_p, {"spec": PartitionSpec(*spec)}, [atom],
                                   [_aval_of(atom)], eqn, stack)
                outs.append(out)
            else:
                outs.append(atom)
        return outs


def _reject_unsupported(eqn, stack: str, source: str) -> None:
    reason = _UNSUPPORTED.get(eqn.primitive.name)
    if reason is None:
        return
    where = source or "an unknown source line"
    scope = f" (in {stack})" if stack else ""
    raise UnsupportedPrimitiveError(
        f"primitive {eqn.primitive.name!r} at {where}{scope} is not supported inside a function "
        f"given to autoshard.compile: {reason}")


def _open(closed: Any) -> tuple[Any, list]:
    if isinstance(closed, jcore.ClosedJaxpr):
        return closed.jaxpr, list(closed.consts)
    return closed, []


def _read(env: dict, atom: Any) -> Value | Literal:
    if isinstance(atom, jcore.Literal):
        return Literal(atom.val, tuple(atom.aval.shape), atom.aval.dtype)
    return env[atom]


def _aval_of(atom: Value | Literal) -> jax.ShapeDtypeStruct:
    weak = getattr(atom, "weak_type", False)
    return jax.ShapeDtypeStruct(atom.shape, atom.dtype, weak_type=weak)


def _join(prefix: str, name: str) -> str:
    return "/".join(p for p in (prefix, name) if p)


def _user_source(eqn) -> str:
    """The innermost frame of the user's own code: outside jax, autoshard and installed
    libraries where there is one (an optax update is reported at the user's ``tx.update``)."""
    frames = list(source_info_util.user_frames(eqn.source_info.traceback))
    if not frames:
        return ""
    own = [f for f in frames if "site-packages" not in f.file_name
           and "dist-packages" not in f.file_name]
    frame = (own or frames)[0]
    return f"{short_path(frame.file_name)}:{frame.start_line} ({frame.function_name})"


@functools.lru_cache(maxsize=None)
def _optimization_barrier_p():
    closed = jax.make_jaxpr(jax.lax.optimization_barrier)(0.0)
    return closed.jaxpr.eqns[0].primitive

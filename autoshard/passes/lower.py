"""Lower a plan: the function that re-evaluates the graph with the plan's layouts, to be jitted
with the plan's argument and result shardings.

Constraining the plan's values is enough; GSPMD/Shardy insert the collectives between them
(checked on jax 0.10.2: a Megatron MLP lowered this way compiles to exactly the collectives of
the hand-annotated jit). Two facts shape the code:

* ``jax.make_mesh`` builds meshes with ``AxisType.Explicit`` axes, on which
  ``with_sharding_constraint`` only asserts. The program is lowered on an ``Auto`` view of the
  user's mesh (same devices, same names); arrays laid out on the user's mesh are equivalent
  shardings (``on_mesh`` re-wraps them, zero-copy), and so are results on the way back.
  Everything inside the program is Auto: arguments, results, closed-over constants and the
  context mesh, which a caller's ``jax.set_mesh`` would otherwise make Explicit.
* ``P`` (partial sum) has no ``PartitionSpec``. A value the plan keeps partial is left
  unconstrained, so the partitioner may keep it unreduced until a consumer's constraint forces
  the reduction, which is where the plan put it. Arguments and results cannot be partial.
  Left so, the partitioner may also reach the consumer's layout another way, e.g. all-gather
  a large activation over a matmul's contracting dim instead of reduce-scattering the much
  smaller weight gradient as the plan does. So a matmul whose partial result every reader
  needs reduced to one layout runs as the plan says, in a ``shard_map``: the local matmul,
  then ``psum`` / ``psum_scatter`` over the partial axes (``_reduced_matmuls``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from autoshard.ir.errors import ShardingError
from autoshard.ir.graph import Graph, Node, Value
from autoshard.ir.interpret import evaluate
from autoshard.ir.mesh import MeshSpec
from autoshard.ir.plan import SOLVER_CHOSEN, Plan
from autoshard.ir.sharding import Broadcast, Partial, ShardingSpec, Split


@dataclass(frozen=True)
class LoweredPlan:
    """A plan made executable: ``fn(*flat_args) -> flat results (a tuple)`` plus flat shardings,
    all on the Auto view of the user's mesh."""

    fn: Callable[..., tuple]
    in_shardings: tuple[NamedSharding, ...]
    out_shardings: tuple[NamedSharding, ...]
    mesh: Mesh


def auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with every axis ``Auto``."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def on_mesh(array: Any, mesh: Mesh) -> Any:
    """``array`` laid out the same way on ``mesh`` (another view of its devices), zero-copy;
    anything that is not a concrete array on a NamedSharding is returned as it is."""
    sharding = getattr(array, "sharding", None) if isinstance(array, jax.Array) and not \
        isinstance(array, jax.core.Tracer) else None
    if not isinstance(sharding, NamedSharding) or sharding.mesh == mesh:
        return array
    target = NamedSharding(mesh, sharding.spec)
    if not array.is_fully_addressable or not sharding.is_equivalent_to(target, array.ndim):
        return array
    return jax.make_array_from_single_device_arrays(
        array.shape, target, [shard.data for shard in array.addressable_shards])


def _graphs(graph: Graph):
    yield graph
    for node in graph.nodes:
        for region in node.regions:
            yield from _graphs(region)


def named_sharding(spec: ShardingSpec, ndim: int, plan_mesh: MeshSpec, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec.to_partition_spec(plan_mesh, ndim, partial="replicate"))


def check_plan(plan: Plan) -> None:
    """Reject what no layout can run: indivisible splits, partial boundaries, split scan axes."""
    graph, mesh = plan.graph, plan.mesh
    out_names = graph.output_names or tuple(str(i) for i in range(len(graph.outputs)))
    boundaries = [(f"argument {v.name or i}", v, s)
                  for i, (v, s) in enumerate(zip(graph.inputs, plan.input_specs))]
    boundaries += [(f"result {name}", a, s)
                   for name, a, s in zip(out_names, graph.outputs, plan.output_specs)]
    for what, atom, spec in boundaries:
        spec.validate(atom.shape, mesh, what=what)
        if spec.has_partial:
            raise ShardingError(f"{what}: a plan cannot give an argument or result a partial-sum"
                                f" (P) spec {spec.format(mesh)}; values cross the function "
                                "boundary whole, so reduce it inside")
    values = graph.value_index()
    for vid, spec in plan.value_specs.items():
        value = values[vid]
        node = graph.node_of(vid)
        spec.validate(value.shape, mesh,
                      what=f"value %{vid} ({node.describe() if node else value.name})")
    _check_scanned_axes(plan)


def _check_scanned_axes(plan: Plan) -> None:
    """A scan never reads or makes a stacked value split along the scanned axis. What it reads
    is the operand's layout when it runs (``operand_specs``, where the plan moves an argument
    stored split over layers before the loop), else the value's; what it makes is the layout
    its results are made in (``made_specs``), else the value's."""
    inputs = {v.id: s for v, s in zip(plan.graph.inputs, plan.input_specs)}
    input_index = {v.id: i for i, v in enumerate(plan.graph.inputs)}
    for node, _ in plan.graph.walk():
        if node.op != "scan":
            continue
        first_x = node.params["num_consts"] + node.params["num_carry"]
        operands = plan.operand_specs.get(node.id) or (None,) * len(node.inputs)
        stacked = [(a, operands[k]) for k, a in enumerate(node.inputs)
                   if k >= first_x and isinstance(a, Value)]
        stacked += [(v, plan.made_specs.get(v.id)) for v in node.outputs[node.params["num_carry"]:]]
        for value, read in stacked:
            spec = read or plan.value_specs.get(value.id) or inputs.get(value.id)
            if spec is None:
                continue
            axes = [plan.mesh.axis_names[i] for i, e in enumerate(spec.sbp)
                    if isinstance(e, Split) and e.dim == 0]
            if axes:
                label = value.name or f"%{value.id}"
                key = f"in:{input_index[value.id]}" if value.id in input_index else value.id
                pinned = plan.reasons.get(key, SOLVER_CHOSEN) != SOLVER_CHOSEN
                advice = ("it is pinned there by the user's "
                          f"{plan.reasons[key]}: pin another dim (the per-layer dims of a "
                          "stacked parameter)" if pinned else
                          "nothing pins it there, so this is a defect of autoshard's search "
                          "(please report it with the step); meanwhile pin this value with "
                          "in_specs or autoshard.hint to a layout that keeps that dim whole")
                raise ShardingError(
                    f"{label} (shape {value.shape}) is scanned over by {node.describe()}, and the "
                    f"plan has the loop read or make it split along its scanned (leading) axis "
                    f"over mesh axis {axes}; a loop runs one slice a step, so that dim cannot be "
                    f"split there; {advice}")


def lower(plan: Plan, mesh: Mesh) -> LoweredPlan:
    """Build the constrained re-evaluation of ``plan.graph`` on an Auto view of ``mesh``."""
    if tuple(mesh.axis_names) != plan.mesh.axis_names or tuple(mesh.axis_sizes) != \
            plan.mesh.axis_sizes:
        raise ShardingError(f"plan was made for mesh {plan.mesh} but is lowered on "
                            f"{MeshSpec.from_jax(mesh)}")
    check_plan(plan)
    amesh = auto_mesh(mesh)
    graph = plan.graph
    values = graph.value_index()
    nodes = {node.id: node for node, _ in graph.walk()}
    constraints = {vid: named_sharding(spec, values[vid].ndim, plan.mesh, amesh)
                   for vid, spec in plan.value_specs.items() if not spec.has_partial}

    constants = {v.id: on_mesh(data, amesh) for g in _graphs(graph)
                 for v, data in ((v, g.constants[v.id]) for v in g.constant_values)}

    made = {vid: named_sharding(spec, values[vid].ndim, plan.mesh, amesh)
            for vid, spec in plan.made_specs.items() if not spec.has_partial}

    def constrain(value: Value, array: Any) -> Any:
        array = constants.get(value.id, array)
        if value.id in made:    # made in one layout, then moved (Plan.made_specs)
            array = jax.lax.with_sharding_constraint(array, made[value.id])
        sharding = constraints.get(value.id)
        return array if sharding is None else jax.lax.with_sharding_constraint(array, sharding)

    operand_constraints = {
        node_id: [None if spec is None or spec.has_partial or not isinstance(atom, Value)
                  else named_sharding(spec, atom.ndim, plan.mesh, amesh)
                  for spec, atom in zip(specs, node.inputs)]
        for node_id, specs in plan.operand_specs.items()
        if (node := nodes.get(node_id)) is not None}

    def constrain_operands(node: Node, arrays: list) -> list:
        shardings = operand_constraints.get(node.id)
        if shardings is None:
            return arrays
        return [a if s is None else jax.lax.with_sharding_constraint(a, s)
                for a, s in zip(arrays, shardings)]

    reduced = _reduced_matmuls(plan, amesh)

    def run_node(node: Node, arrays: list) -> list | None:
        run = reduced.get(node.id)
        return None if run is None else [run(*arrays)]

    def fn(*flat_args: Any) -> tuple:
        with jax.sharding.use_abstract_mesh(amesh.abstract_mesh):
            return tuple(evaluate(graph, flat_args, on_value=constrain,
                                  on_operands=constrain_operands if operand_constraints
                                  else None, run_node=run_node if reduced else None))

    in_shardings = tuple(named_sharding(s, v.ndim, plan.mesh, amesh)
                         for v, s in zip(graph.inputs, plan.input_specs))
    out_shardings = tuple(named_sharding(s, len(a.shape), plan.mesh, amesh)
                          for a, s in zip(graph.outputs, plan.output_specs))
    return LoweredPlan(fn, in_shardings, out_shardings, amesh)



def _reduced_matmuls(plan: Plan, mesh: Mesh) -> dict[int, Callable]:
    """Top-level ``dot_general`` node id -> a ``shard_map`` that computes it as the plan does
    and reduces its partial sum to the one layout all its readers need. Only where reaching
    that layout takes no gather (each P becomes B or a split, each B stays or becomes a split,
    each split stays); otherwise the partitioner is left to it."""
    graph = plan.graph
    results = {a.id for a in graph.outputs if isinstance(a, Value)}
    out: dict[int, Callable] = {}
    for node in graph.nodes:
        if node.op != "dot_general" or len(node.outputs) != 1:
            continue
        value = node.outputs[0]
        made = plan.value_specs.get(value.id)
        operands = plan.operand_specs.get(node.id)
        readers = graph.consumers(value)
        if (made is None or not made.has_partial or value.id in results or operands is None
                or not readers or any(not isinstance(a, Value) or s is None or s.has_partial
                                      for a, s in zip(node.inputs, operands))):
            continue
        needed = {(plan.operand_specs.get(r.id) or (None,) * len(r.inputs))[k]
                  for r in readers for k, atom in enumerate(r.inputs)
                  if isinstance(atom, Value) and atom.id == value.id}
        if len(needed) != 1 or None in needed:
            continue
        (target,) = needed
        run = _reduce_matmul(node, made, target, operands, plan.mesh, mesh)
        if run is not None:
            out[node.id] = run
    return out


def _reduce_matmul(node: Node, made: ShardingSpec, target: ShardingSpec, operands,
                   plan_mesh: MeshSpec, mesh: Mesh) -> Callable | None:
    names, sizes = plan_mesh.axis_names, plan_mesh.axis_sizes
    ndim = node.outputs[0].ndim
    psum: list[str] = []
    for have, want, name in zip(made.sbp, target.sbp, names):
        if isinstance(have, Partial) and isinstance(want, Broadcast):
            psum.append(name)
        elif isinstance(want, Partial) or not (
                have == want or isinstance(want, Split) and isinstance(have, (Partial, Broadcast))):
            return None                       # a gather, or a split moved to another dim
    # each dim keeps the matmul's own splits (major), then the target's other axes in its
    # order: a replicated axis slices the piece, a partial one reduce-scatters it; where the
    # target puts them before the matmul's own, the readers' constraint permutes the pieces
    # (consecutive partial axes on a dim are one reduce-scatter over all of them, as priced)
    steps: list[tuple[int, str, list[str], int]] = []   # (dim, "slice" | "scatter", axes, size)
    entries = []
    for dim in range(ndim):
        kept = made.dim_axes(dim)
        extra = [a for a in target.dim_axes(dim) if a not in kept]
        for a in extra:
            kind = "scatter" if isinstance(made.sbp[a], Partial) else "slice"
            if kind == "scatter" and steps and steps[-1][:2] == (dim, "scatter"):
                steps[-1][2].append(names[a])
            else:
                steps.append((dim, kind, [names[a]], sizes[a]))
        axes = [names[a] for a in (*kept, *extra)]
        entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    in_specs = tuple(s.to_partition_spec(plan_mesh, a.ndim) for s, a in zip(operands, node.inputs))
    out_spec = PartitionSpec(*entries)
    primitive, params = node.primitive, node.params

    def local(*blocks):
        y = primitive.bind(*blocks, **params)
        for dim, kind, axes, size in steps:
            if kind == "scatter":
                y = jax.lax.psum_scatter(y, tuple(axes), scatter_dimension=dim, tiled=True)
            else:
                piece = y.shape[dim] // size
                y = jax.lax.dynamic_slice_in_dim(y, jax.lax.axis_index(axes[0]) * piece, piece,
                                                 axis=dim)
        if psum:
            y = jax.lax.psum(y, tuple(psum))
        return y

    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_spec,
                         check_vma=False)

"""Seed plans (passes/seeds.py): the replicated, data-parallel and fully-sharded plans, priced
in the search's currency, and the planner never returning a plan one of them beats."""

import jax
import jax.numpy as jnp
import numpy as np

from autoshard import MeshSpec
from autoshard.cost_model.hardware import get_hardware
from autoshard.ir.plan import SolverStats
from autoshard.passes.latency import total_nanoseconds
from autoshard.passes.lift import lift
from autoshard.passes.pins import collect_pins
from autoshard.passes.problem import build_problem
from autoshard.passes.search import _against_seeds, priced_seeds
from autoshard.passes.seeds import seed_choices
from autoshard.passes.state import updated_arguments
from autoshard.passes.trace import trace

HW = get_hardware("h100")
MESH = MeshSpec(("data",), (4,))


def sgd_step(params, x):
    def loss(params):
        return jnp.sum(jnp.tanh(x @ params["w1"]) @ params["w2"])

    grads = jax.grad(loss)(params)
    return jax.tree.map(lambda w, g: w - 0.1 * g, params, grads)


def planning_problem():
    params = {"w1": jax.ShapeDtypeStruct((64, 128), jnp.float32),
              "w2": jax.ShapeDtypeStruct((128, 32), jnp.float32)}
    x = jax.ShapeDtypeStruct((32, 64), jnp.float32)
    traced = trace(sgd_step, (params, x))
    graph = lift(traced)
    pins = collect_pins(graph, MESH, in_specs=None, out_specs=None, in_tree=traced.in_tree,
                        out_tree=traced.out_tree)
    updated = updated_arguments(graph)
    return graph, build_problem(graph, MESH, HW, pins, updated=updated), updated


def input_layouts(pp, graph, choice):
    out = []
    for value in graph.inputs:
        slot, _ = pp.value_slot[value.id]
        out.append(pp.slots[slot].strategies[int(choice[slot])].outputs[0])
    return out


def test_seeds_lay_the_arguments_out_as_their_rules_do():
    graph, pp, updated = planning_problem()
    batch = (2,)                       # flat inputs: w1, w2, x
    seeds = seed_choices(pp, graph, MESH, batch, set(updated.values()))
    assert set(seeds) == {"replicated", "data parallel", "fully sharded"}
    assert all(s.is_replicated for s in input_layouts(pp, graph, seeds["replicated"]))
    w1, w2, x = input_layouts(pp, graph, seeds["data parallel"])
    assert w1.is_replicated and w2.is_replicated and x.dim_axes(0) == (0,)
    w1, w2, x = input_layouts(pp, graph, seeds["fully sharded"])
    assert w1.dim_axes(1) == (0,) and w2.dim_axes(0) == (0,) and x.dim_axes(0) == (0,)
    # the replicated seed follows its operands: no op splits its work, nothing is moved
    replicated = seeds["replicated"]
    assert all(slot.strategies[int(c)].divisor == 1
               for slot, c in zip(pp.slots, replicated) if slot.kind == "op")


def test_a_plan_a_seed_beats_is_replaced_and_the_summary_says_so():
    graph, pp, updated = planning_problem()
    problem = pp.problem
    # a poor plan for so small a step: the fully-sharded seed's, collectives and all (the
    # replicated plan computes everything everywhere in 80 ns, with no collective)
    poor = seed_choices(pp, graph, MESH, (2,), set(updated.values()))["fully sharded"]
    stats = SolverStats("lp (highs)", problem.num_nodes, problem.num_edges,
                        int(problem.num_strategies.sum()), 0.0, 0.0)
    priced = priced_seeds(pp, graph, MESH, HW, (2,), set(updated.values()))
    choice, stats = _against_seeds(pp, MESH, HW, poor, stats, priced, None)
    taken = stats.details["seed_taken"]
    seeds = stats.details["seeds"]
    assert taken == "replicated"
    assert seeds[taken] == min(seeds.values())
    assert total_nanoseconds(pp, choice, MESH, HW) / 1e9 == seeds[taken]
    assert total_nanoseconds(pp, choice, MESH, HW) < total_nanoseconds(pp, poor, MESH, HW)
    assert stats.outcome.startswith(f"the {taken} seed (")
    # a plan no seed beats is kept; a gap is stated next to the best seed's cost
    fresh = SolverStats("cp-sat", problem.num_nodes, problem.num_edges,
                        int(problem.num_strategies.sum()), 0.0, 0.0, gap=0.05,
                        status="feasible")
    kept, again = _against_seeds(pp, MESH, HW, choice, fresh, priced, None)
    assert (kept == choice).all() and "seed_taken" not in again.details
    assert again.outcome.startswith("feasible, gap 5.00%; best seed: replicated ")

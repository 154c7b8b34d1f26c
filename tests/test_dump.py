"""autoshard.dump / load_plan: the plan.json schema round-trips, other versions are refused,
each op's explanation prices exactly what switching it alone would cost, and the CLI's
summary and diff read dumps back."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autoshard
from autoshard.cli import main as cli
from autoshard.dump import (DUMP_VERSION, argument_label, diff_plans, layer_labels,
                            trace_events)
from autoshard.ir.plan_json import plan_from_json
from autoshard.passes.prediction.explain import local_costs
from autoshard.solver.problem import Problem, evaluate
from autoshard.viewer import render_page
from tests.conftest import make_mesh

LAYERS, WIDTH, BATCH = 2, 32, 16


def init(key):
    keys = jax.random.split(key, LAYERS + 1)
    return {"towers": [{"kernel": jax.random.normal(k, (WIDTH, WIDTH)) / WIDTH ** 0.5,
                        "bias": jnp.zeros((WIDTH,))} for k in keys[:-1]],
            "readout": jax.random.normal(keys[-1], (WIDTH, 4))}


def loss(params, batch):
    x = batch["x"]
    for tower in params["towers"]:
        x = jnp.tanh(x @ tower["kernel"] + tower["bias"])
    return jnp.mean((x @ params["readout"] - batch["y"]) ** 2)


def sgd_step(params, batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), value


def example():
    kx, ky = jax.random.split(jax.random.key(1))
    return init(jax.random.key(0)), {"x": jax.random.normal(kx, (BATCH, WIDTH)),
                                     "y": jax.random.normal(ky, (BATCH, 4))}


@pytest.fixture(scope="module")
def mesh():
    return make_mesh((2, 4))


@pytest.fixture(scope="module")
def searched(mesh):
    return autoshard.compile(sgd_step, *example(), mesh=mesh)


@pytest.fixture(scope="module")
def dumped(searched, tmp_path_factory):
    return autoshard.dump(searched, tmp_path_factory.mktemp("searched"))


def test_round_trip_keeps_specs_paths_and_costs(searched, dumped):
    plan = searched.plan
    loaded = autoshard.load_plan(dumped)
    assert isinstance(loaded, autoshard.PlanDump)
    assert loaded.mesh == plan.mesh and loaded.method == plan.method
    assert [r.path for r in loaded.inputs] == [v.name for v in plan.graph.inputs]
    assert "params['towers'][1]['kernel']" in [r.path for r in loaded.inputs]
    assert [r.spec for r in loaded.inputs] == list(plan.input_specs)
    assert [r.spec for r in loaded.outputs] == list(plan.output_specs)
    assert [r.bytes_per_device for r in loaded.inputs] == [
        plan.bytes_per_device(v, s) for v, s in zip(plan.graph.inputs, plan.input_specs)]
    assert len(loaded.nodes) == plan.graph.num_nodes()
    explained = [n for n in loaded.nodes if n.cost is not None]
    assert explained and len(explained) == len(plan.explanation)
    for row in explained:
        why = plan.explanation[row.id]
        assert row.strategy == why.chosen.label
        np.testing.assert_allclose(row.total_seconds, why.chosen.total_seconds, rtol=1e-3)
        assert len(row.rejected) == len(why.rejected)
    assert loaded.memory["curve"] == list(plan.memory_curve)
    assert loaded.memory["peak"] == plan.prediction.peak_memory_bytes
    assert loaded.memory["live_peak"] == max(plan.memory_curve) <= loaded.memory["peak"]
    assert loaded.prediction["step_seconds"] == plan.prediction.step_seconds
    # the decisions section is the plan_json record: the lead's reader re-attaches it
    doc = json.loads((dumped / "plan.json").read_text())
    again = plan_from_json(doc, plan.graph, in_tree=plan.in_tree, out_tree=plan.out_tree)
    assert dict(again.value_specs) == dict(plan.value_specs)
    assert loaded.pipeline is None and not (dumped / "plan.trace.json").exists()


def test_other_versions_and_broken_files_are_refused(dumped, tmp_path):
    doc = json.loads((dumped / "plan.json").read_text())
    for key, value, says in (("dump_version", DUMP_VERSION + 1, "dump version"),
                             ("version", 99, "schema version"),
                             ("schema", "something.else", "not an autoshard plan")):
        bad = tmp_path / key
        bad.mkdir()
        (bad / "plan.json").write_text(json.dumps({**doc, key: value}))
        with pytest.raises(autoshard.PlanError, match=says):
            autoshard.load_plan(bad)
    (tmp_path / "plan.json").write_text("{not json")
    with pytest.raises(autoshard.PlanError, match="not readable JSON"):
        autoshard.load_plan(tmp_path)
    with pytest.raises(autoshard.PlanError, match="does not exist.*autoshard.dump"):
        autoshard.load_plan(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "plan.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "nodes"}))
    with pytest.raises(autoshard.PlanError, match="malformed"):
        autoshard.load_plan(broken)


def test_local_costs_equal_the_objective_change_of_one_switch():
    """Differential: on random problems, local cost of strategy s minus that of the choice
    equals evaluate() of the choice with that one node switched, minus evaluate() of it."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        n = 7
        k = rng.integers(1, 5, n)
        edges = [(u, v) for u in range(n) for v in range(u + 1, n) if rng.random() < 0.4]
        problem = Problem.from_lists(
            [rng.integers(0, 100, ki).astype(float) for ki in k], [np.zeros(ki) for ki in k],
            [(0, 1)] * n, edges, [rng.integers(0, 50, (k[u], k[v])).astype(float)
                                  for u, v in edges])
        choice = np.array([rng.integers(0, ki) for ki in k])
        local = local_costs(problem, choice)
        base = evaluate(problem, choice).cost
        for i in range(n):
            for s in range(k[i]):
                switched = choice.copy()
                switched[i] = s
                here = problem.offsets[i]
                assert local[here + s] - local[here + choice[i]] == pytest.approx(
                    evaluate(problem, switched).cost - base)


def test_explanation_ranks_rejected_strategies_and_names_collectives(searched):
    plan = searched.plan
    assert plan.hardware == "h100" and len(plan.memory_curve) == len(plan.graph.nodes) + 2
    # the curve is live bytes; the peak adds the holes between buffers (cost_model/buffers.py)
    assert 0 < max(plan.memory_curve) <= plan.prediction.peak_memory_bytes
    for why in plan.explanation.values():
        totals = [r.total_seconds for r in why.rejected]
        assert totals == sorted(totals)
        assert len(why.rejected) <= min(3, why.num_strategies - 1)
        for cause in why.collectives:
            assert set(cause.axes) <= set(plan.mesh.axis_names) and cause.bytes > 0
    dots = [n for n, _ in plan.graph.walk() if n.op == "dot_general"]
    assert all(plan.explanation[n.id].num_strategies > 1 for n in dots)


def test_layers_group_ops_with_the_parameters_they_read(searched):
    graph = searched.plan.graph
    labels = layer_labels(graph)
    dots = [labels[n.id] for n in graph.nodes if n.op == "dot_general"]
    assert {"towers[0]", "towers[1]", "readout"} <= set(dots)
    assert argument_label("opt_state[0].mu['blocks'][3]['wq']") == "blocks[3]"
    assert argument_label("params['layers_2']['mlp']['w']") == "layers_2"
    assert argument_label("opt_state[0].mu['head']") == "head"
    assert argument_label("in[3]") == ""


def test_summary_and_diff_from_the_command_line(searched, dumped, mesh, tmp_path, capsys):
    assert cli(["summary", str(dumped)]) == 0
    text = capsys.readouterr().out
    for expected in ["(data=2, model=4)", "params['towers'][0]['kernel']", "costliest ops",
                     "predicted step"]:
        assert expected in text, expected
    rule = autoshard.compile(sgd_step, *example(), mesh=mesh, planner="data-parallel")
    other = autoshard.dump(rule.plan, tmp_path / "rule")
    assert cli(["diff", str(dumped), str(dumped)]) == 0
    assert "the plans agree" in capsys.readouterr().out
    assert cli(["diff", str(dumped), str(other)]) == 1
    text = capsys.readouterr().out
    assert "method: cost-model search -> data-parallel" in text
    changed = [v.name for v, a, b in zip(searched.plan.graph.inputs,
                                         searched.plan.input_specs, rule.plan.input_specs)
               if a != b]
    assert changed and all(f"argument {p}:" in text for p in changed)
    assert diff_plans(autoshard.load_plan(dumped), autoshard.load_plan(other))
    assert cli(["summary", str(tmp_path / "nowhere")]) == 2
    assert "autoshard.dump" in capsys.readouterr().err


def test_page_inlines_the_plan_safely_and_pipelines_get_a_trace():
    page = render_page(json.dumps({"source": "</script><script>alert(1)</script>"}))
    assert page.count("</script>") == 2 and "alert(1)</script>" not in page
    assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:|//)""", page)
    assert "fetch(" not in page and "XMLHttpRequest" not in page
    events = trace_events({"stages": [{"name": "stage 0", "devices": [0, 1]}],
                           "timeline": [{"stage": 0, "name": "fwd mb0", "start": 0.0,
                                         "end": 1e-3}]})
    assert {"name": "fwd mb0", "ph": "X", "pid": 0, "tid": 0, "ts": 0.0,
            "dur": 1e3} in events["traceEvents"]


def test_cli_summary_formats_the_gap_folds_mirrors_and_prints_the_annotation_report(
        searched, tmp_path, capsys):
    """``autoshard summary``: the gap as a percentage, and only where it is a gap to the optimum
    (a plan moved for start-up latency is above the bandwidth-only bound on purpose); results
    that mirror their parameter's layout counted, not repeated; plan.json's annotation
    report printed."""
    from dataclasses import replace

    from autoshard.ir.plan import AnnotationDiff, AnnotationReport
    from autoshard.ir.sharding import ShardingSpec

    plan = searched.plan
    kernel = "params['towers'][0]['kernel']"
    report = AnnotationReport("hint", 2, (AnnotationDiff(
        kernel, ShardingSpec.parse("(B, S1)"), ShardingSpec.parse("(B, B)"), 2e-6, False),),
        3e-4, 2e-4, 4096, 2048)
    stopped = replace(plan, annotation_report=report, solver=replace(
        plan.solver, status="feasible", gap=0.2253, details={}))
    assert cli(["summary", str(autoshard.dump(stopped, tmp_path / "stopped"))]) == 0
    text = capsys.readouterr().out
    assert "feasible, gap 22.53%" in text and "0.2253" not in text
    assert "annotations (hint): 1 of 2 annotated arguments differ" in text
    assert re.search(re.escape(kernel) + r"\s+annotated \(B, S1\)\s+searched \(B, B\)", text)
    results = text[text.index("results:"):text.index("annotations")].splitlines()
    laid_out = {v.name.removeprefix("params"): s
                for v, s in zip(plan.graph.inputs, plan.input_specs)}
    mirrors = sum(laid_out.get(name.removeprefix("out[0]")) == s
                  for name, s in zip(plan.graph.output_names, plan.output_specs))
    assert mirrors > 0                          # the new parameters, laid out as the old
    assert f"... {mirrors} more mirror their parameter's layout" in "\n".join(results)
    assert not any("out[0]['towers']" in line for line in results if "mirror" not in line)

    moved = replace(plan, solver=replace(plan.solver, status="feasible", gap=0.2253,
                                         details={"latency_forbidden": ["replicated state"]}))
    assert cli(["summary", str(autoshard.dump(moved, tmp_path / "moved"))]) == 0
    text = capsys.readouterr().out
    assert "gap 22.53%" not in text
    assert ("moved off the LP optimum for start-up latency (replicated state): 22.53% above "
            "the LP bound by bandwidth alone") in text
    assert moved.summary().count("moved off the LP optimum") == 1      # Plan.summary agrees

"""The plan cache: hit, miss, corrupt and stale entries, bypass, and atomic concurrent writes."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import autoshard
from autoshard import ShardingSpec
from autoshard.ir.plan_json import SCHEMA_VERSION, plan_from_json, plan_to_json
from autoshard.ir.errors import PlanError
from autoshard.plan_cache import PlanCacheWarning, atomic_write_text
from tests.conftest import make_mesh
from tests.models import mlp

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOSHARD_CACHE", "1")
    monkeypatch.setenv("AUTOSHARD_CACHE_DIR", str(tmp_path / "plans"))
    return tmp_path / "plans"


@pytest.fixture(scope="module")
def example():
    return mlp.init(jax.random.key(0)), mlp.batch(jax.random.key(1))


def compile_mlp(example, **kw):
    return autoshard.compile(mlp.loss, *example, mesh=make_mesh((2, 4)), **kw)


def entries(cache_dir):
    return sorted(cache_dir.rglob("*.json"))


def test_miss_then_hit_gives_the_same_plan(cache_dir, example):
    first = compile_mlp(example)
    assert first.plan_source == "solved"
    assert len(entries(cache_dir)) == 1
    second = compile_mlp(example)
    assert second.plan_source == "cache"
    assert second.plan_digest == first.plan_digest
    assert second.plan.input_specs == first.plan.input_specs
    assert dict(second.plan.value_specs) == dict(first.plan.value_specs)
    assert second.plan.prediction == first.plan.prediction
    np.testing.assert_allclose(second(*example), first(*example), rtol=1e-6)
    # another option is another key: solved again, a second entry
    third = compile_mlp(example, hardware="h100-2node")
    assert third.plan_source == "solved" and len(entries(cache_dir)) == 2


def test_cache_false_writes_nothing(cache_dir, example):
    assert compile_mlp(example, cache=False).plan_source == "solved"
    assert not cache_dir.exists() or not entries(cache_dir)


def test_corrupt_entry_is_ignored_and_replaced(cache_dir, example):
    compile_mlp(example)
    (entry,) = entries(cache_dir)
    entry.write_text(entry.read_text()[:200])  # a truncated file
    with pytest.warns(PlanCacheWarning, match="is not valid JSON"):
        again = compile_mlp(example)
    assert again.plan_source == "solved"
    json.loads(entry.read_text())  # rewritten whole
    assert compile_mlp(example).plan_source == "cache"


@pytest.mark.parametrize("field,value,message", [
    ("graph_fingerprint", "0" * 64, "made for a different program"),
    ("version", SCHEMA_VERSION + 1, "schema version"),
])
def test_stale_entry_is_ignored(cache_dir, example, field, value, message):
    compile_mlp(example)
    (entry,) = entries(cache_dir)
    doc = json.loads(entry.read_text())
    doc["plan"][field] = value
    entry.write_text(json.dumps(doc))
    with pytest.warns(PlanCacheWarning, match=message):
        assert compile_mlp(example).plan_source == "solved"


def test_plan_record_round_trip_and_rejects_other_graph(example):
    fn = compile_mlp(example, cache=False)
    plan = fn.plan
    doc = json.loads(json.dumps(plan_to_json(plan)))
    back = plan_from_json(doc, plan.graph, in_tree=plan.in_tree, out_tree=plan.out_tree)
    assert back.input_specs == plan.input_specs and back.output_specs == plan.output_specs
    assert dict(back.value_specs) == dict(plan.value_specs)
    assert dict(back.operand_specs) == dict(plan.operand_specs)
    assert back.solver == plan.solver and back.prediction == plan.prediction
    # the layouts values are made in before the plan moves them (Plan.made_specs)
    made = {next(iter(plan.value_specs)): ShardingSpec.replicated(plan.mesh.ndim)}
    moved = dataclasses.replace(plan, made_specs=made)
    assert dict(plan_from_json(json.loads(json.dumps(plan_to_json(moved))), plan.graph,
                               in_tree=plan.in_tree, out_tree=plan.out_tree).made_specs) == made
    # what the viewer shows survives too, so a cache hit dumps with its costs
    assert plan.explanation and dict(back.explanation) == dict(plan.explanation)
    assert back.memory_curve == plan.memory_curve and back.hardware == plan.hardware == "h100"
    half = jax.tree.map(lambda a: a[: mlp.BATCH // 2], example[1])
    other = autoshard.compile(mlp.loss, example[0], half, mesh=make_mesh((2, 4)),
                              cache=False).plan
    with pytest.raises(PlanError, match="different program"):
        plan_from_json(doc, other.graph, in_tree=other.in_tree, out_tree=other.out_tree)


_WRITER = """
import sys
from autoshard.plan_cache import atomic_write_text
path, tag = sys.argv[1], sys.argv[2]
for i in range(150):
    atomic_write_text(path, tag * 400_000 + str(i).zfill(4))
"""


def test_concurrent_writers_never_expose_a_partial_entry(tmp_path):
    path = tmp_path / "entry.json"
    atomic_write_text(path, "c" * 400_000 + "0000")
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), tag], cwd=ROOT)
               for tag in "ab"]
    reads = 0
    while any(w.poll() is None for w in writers):
        text = path.read_text()
        assert len(text) == 400_004 and text[0] in "abc" and text[:400_000] == text[0] * 400_000
        reads += 1
    assert all(w.wait(timeout=60) == 0 for w in writers)
    assert reads > 10
    assert not list(tmp_path.glob("*.tmp"))

"""Two processes x 4 CPU devices on 127.0.0.1 (jax.distributed, gloo) against one process with 8.

Each scenario starts tests/multiprocess_worker.py twice with a bounded timeout, so a hang fails
the test rather than CI, and reads the JSON each process writes.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import autoshard
from tests.conftest import make_mesh
from tests.models import gpt

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
#: the devices these run on; on H100 the test GPT's step is latency bound and its best plan
#: replicates everything, which would leave the process-local placement untested
HARDWARE = "cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(scenario, out_dir, *, agreement_timeout=120, cache_dir=None):
    env = dict(os.environ, AUTOSHARD_CACHE="1", AUTOSHARD_AGREEMENT_TIMEOUT=str(agreement_timeout),
               AUTOSHARD_CACHE_DIR=str(cache_dir or out_dir / "cache"), PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", scenario,
                               str(i), "2", port, str(out_dir)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"scenario {scenario!r}: a process did not finish in {TIMEOUT_S}s")
    results = {}
    for i in range(2):
        path = out_dir / f"result-{i}.json"
        if path.exists():
            results[i] = json.loads(path.read_text())
    assert 0 in results, f"process 0 wrote no result; its output:\n{logs[0][-3000:]}"
    return results


@pytest.fixture(scope="module")
def single_process():
    """The same train step planned and run in this process on all 8 devices."""
    mesh = make_mesh((2, 4))
    params = gpt.init(jax.random.key(0))
    opt_state = gpt.tx.init(params)
    batch = gpt.batch(jax.random.key(1))
    step = autoshard.compile(gpt.train_step, params, opt_state, batch, mesh=mesh, cache=False,
                             hardware=HARDWARE)
    losses = []
    for _ in range(2):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    flat = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(params)}
    return step.plan_digest, losses, flat


def test_two_processes_match_one_process(tmp_path, single_process):
    digest, losses, params = single_process
    results = run_two_processes("train", tmp_path)
    assert set(results) == {0, 1}, results
    for r in results.values():
        assert "error" not in r, r["error"]
        # device ids are not contiguous across processes; the mesh orders them
        assert r["devices"] == [0, 1, 2, 3, 2048, 2049, 2050, 2051] or len(r["devices"]) == 8
        assert r["digest"] == digest  # the same plan as one process with 8 devices
        assert r["source"] == "solved"
        np.testing.assert_allclose(r["losses"], losses, rtol=1e-5)
        assert all(r["placed"].values()), r["placed"]  # shard_process_local on 5 layouts
    got = np.load(tmp_path / "params.npz")
    assert sorted(got.files) == sorted(params)
    for name, value in params.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    # both processes wrote the same cache entry at once; it is whole and valid
    entries = list((tmp_path / "cache").rglob("*.json"))
    assert len(entries) == 1
    assert json.loads(entries[0].read_text())["plan"]["graph_fingerprint"]
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_different_plans_are_caught(tmp_path):
    results = run_two_processes("mismatch", tmp_path)
    for me, other in ((0, 1), (1, 0)):
        error = results[me]["error"]
        assert error.startswith("PlanAgreementError"), error
        assert f"process {me} and process {other} chose different plans" in error
        # names a differing value and its layout on each process
        assert re.search(rf"\n  input \S+: \(.+\) on process {me}, \(.+\) on process {other}\n",
                         error), error


def test_failed_process_is_named(tmp_path):
    results = run_two_processes("fail", tmp_path)
    assert results[1]["error"].startswith("PlanInfeasibleError")
    error = results[0]["error"]
    assert error.startswith("PlanAgreementError") and "process 1 failed to plan" in error
    assert "PlanInfeasibleError: " in error and "memory limit of 1,024 bytes" in error


def test_absent_process_times_out(tmp_path):
    results = run_two_processes("absent", tmp_path, agreement_timeout=6)
    error = results[0]["error"]
    assert error.startswith("PlanAgreementError")
    assert "process 1 of 2 did not report its plan within 6s" in error

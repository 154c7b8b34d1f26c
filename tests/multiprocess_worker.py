"""One process of a two-process autoshard run (started by tests/test_multiprocess.py).

    python -m tests.multiprocess_worker SCENARIO PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Each process has 4 simulated CPU devices; together they form one (2, 4) mesh with gloo
collectives over 127.0.0.1. The process writes ``OUT_DIR/result-<id>.json`` (and process 0 the
new parameters as ``params.npz``) so the test can compare against a single-process run.
Scenarios: ``train`` (plan, agree, two train steps; the test GPT), ``mismatch`` (process 1 pins a
different layout), ``fail`` (process 1 is given an impossible memory budget), ``absent``
(process 1 never plans; process 0 must time out naming it); the last three plan the test MLP,
as they test the agreement, not the plan.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import autoshard  # noqa: E402
import autoshard.runtime.multihost  # noqa: E402
from tests.models import gpt, mlp  # noqa: E402


def placement_checks(mesh, full, local):
    """Process-local rows placed on layouts that do and do not follow the process split: each
    must hold the global array (checked by sums of the global array gathered back)."""
    out = {}
    for spec in (P("data"), P(("data", "model")), P("model"), P(None, "model"), P()):
        placed = autoshard.runtime.multihost.shard_process_local(
            local, NamedSharding(mesh, spec), full.shape, "tokens")
        back = multihost_utils.process_allgather(placed, tiled=True)
        out[str(spec)] = bool(np.array_equal(np.asarray(back), full))
    return out


def main(scenario, process_id, num_processes, port, out_dir):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=60)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    model = gpt if scenario == "train" else mlp
    params = model.init(jax.random.key(0))
    opt_state = model.tx.init(params)
    full_batch = jax.tree.map(np.asarray, model.batch(jax.random.key(1)))
    rows = model.BATCH // num_processes
    local_batch = jax.tree.map(lambda a: a[process_id * rows:(process_id + 1) * rows],
                               full_batch)
    # every process holds the same initial state; global arrays, replicated
    replicated = NamedSharding(mesh, P())
    params, opt_state = jax.device_put((params, opt_state), replicated)
    batch_struct = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), full_batch)
    result = {"process": process_id, "devices": [d.id for d in mesh.devices.flat]}
    options = {}
    if scenario == "mismatch" and process_id == 1:
        options["in_specs"] = (None, None, {"x": P("model"), "y": None})
    if scenario == "fail" and process_id == 1:
        options["memory_budget"] = 1024
    if scenario == "absent" and process_id == 1:
        time.sleep(float(os.environ["AUTOSHARD_AGREEMENT_TIMEOUT"]) + 2)  # never plans
        result["absent"] = True
    else:
        try:
            run_steps(result, model, mesh, (params, opt_state), batch_struct, local_batch,
                      full_batch, options, process_id, out_dir)
        except autoshard.AutoshardError as err:
            result["error"] = f"{type(err).__name__}: {err}"
    finish(result, process_id, num_processes, out_dir)


def run_steps(result, model, mesh, state, batch_struct, local_batch, full_batch, options,
              process_id, out_dir):
    params, opt_state = state
    start = time.perf_counter()
    step = autoshard.compile(model.train_step, params, opt_state, batch_struct, mesh=mesh,
                             hardware="cpu", **options)  # as tests/test_multiprocess.py
    result.update(planning_seconds=time.perf_counter() - start, source=step.plan_source,
                  digest=step.plan_digest)
    batch = step.shard_batch(local_batch)
    result["batch_sharding"] = str(batch["tokens"].sharding.spec)
    losses = []
    for _ in range(2):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
    result["losses"] = losses
    result["placed"] = placement_checks(mesh, full_batch["tokens"], local_batch["tokens"])
    gathered = multihost_utils.process_allgather(params, tiled=True)
    if process_id == 0:
        flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in
                jax.tree_util.tree_leaves_with_path(gathered)}
        np.savez(os.path.join(out_dir, "params.npz"), **flat)


def finish(result, process_id, num_processes, out_dir):
    with open(os.path.join(out_dir, f"result-{process_id}.json"), "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    # wait for every process's report before leaving: process 0 hosts the coordination service,
    # and a process that leaves early stops its heartbeats, which the service treats as a crash
    # of the whole job while a peer may still be planning
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not all(
            os.path.exists(os.path.join(out_dir, f"result-{i}.json"))
            for i in range(num_processes)):
        time.sleep(0.2)
    os._exit(0)  # skip jax.distributed's shutdown barrier: a failed peer may never reach it


if __name__ == "__main__":
    scenario, pid, count, port, out = sys.argv[1:6]
    main(scenario, int(pid), int(count), int(port), out)

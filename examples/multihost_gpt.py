"""The GPT example on several processes with ``jax.distributed`` (one process per host).

Here, two processes with 4 simulated CPU devices each, talking over 127.0.0.1 (gloo):

    python examples/multihost_gpt.py --process-id 0 --num-processes 2 &
    python examples/multihost_gpt.py --process-id 1 --num-processes 2

On a GPU/TPU cluster, run one process per host with ``--coordinator HOST0:PORT`` (the address of
process 0) and drop ``--local-devices``: each process sees its host's accelerators. The step is
the one of examples/gpt.py; every process plans it, the plans are checked equal across processes,
and each process feeds only its own rows of the batch (``step.shard_batch``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--coordinator", default="127.0.0.1:12355",
                        help="host:port of process 0 (the coordination service)")
    parser.add_argument("--local-devices", type=int, default=4,
                        help="simulated CPU devices per process (0: use the real accelerators)")
    parser.add_argument("--mesh", default="2,4", help="mesh shape over all processes' devices")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.local_devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import numpy as np
    import optax

    import autoshard

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpt import init_params, make_train_step

    if args.local_devices:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id)
    me, count = jax.process_index(), jax.process_count()
    shape = tuple(int(s) for s in args.mesh.split(","))
    mesh = jax.make_mesh(shape, ("data", "model")[: len(shape)])

    # the same initial state on every process, as a global (replicated) array
    params = init_params(jax.random.key(0), vocab=256, d_model=args.d_model, n_heads=8,
                         n_layers=args.layers, seq_len=args.seq)
    optimizer = optax.adamw(3e-3)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(optimizer.init(params), replicated)
    # each process loads only its rows of the global batch
    rows = args.batch // count
    tokens = np.random.default_rng(1000 + me).integers(0, 256, (rows, args.seq + 1), np.int32)
    local_batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    batch_shape = {k: jax.ShapeDtypeStruct((args.batch, args.seq), np.int32)
                   for k in local_batch}

    start = time.perf_counter()
    step = autoshard.compile(make_train_step(optimizer, 8), params, opt_state, batch_shape,
                             mesh=mesh)
    seconds = time.perf_counter() - start
    source = {"cache": "reused from the plan cache", "solved": "solved"}[step.plan_source]
    print(f"[process {me}/{count}] planned in {seconds:.2f}s ({source}), plan "
          f"{step.plan_digest[:12]} agreed by all processes", flush=True)
    if me == 0:
        print(step.plan.summary(max_rows=8), flush=True)
    batch = step.shard_batch(local_batch)
    for i in range(args.steps):
        params, opt_state, loss = step(params, opt_state, batch)
        print(f"[process {me}/{count}] step {i}: loss {float(loss):.4f}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()

"""Lifting: every construct a real train step contains becomes graph nodes (calls inlined,
loops and conditionals kept as regions), and interpreting the graph reproduces the function's
outputs bit for bit (both sides jitted)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import primitives as jprims
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard.ir.graph import Literal, Value, verify
from autoshard.ir.interpret import evaluate
from autoshard.passes.lift import lift, lift_jaxpr
from autoshard.passes.trace import trace
from tests.models import conv, example_args, gpt, llama, mlp, moe, scan_gpt

INLINED = {"jit", "pjit", "closed_call", "custom_jvp_call", "custom_vjp_call", "remat2",
           "checkpoint"}


def lift_fn(fn, *args, **kwargs):
    traced = trace(fn, args, **kwargs)
    graph = lift(traced)
    verify(graph)
    return traced, graph


def assert_graph_reproduces(fn, *args):
    """jit(interpret(graph)) == jit(fn), exactly."""
    _, graph = lift_fn(fn, *args)
    flat = jax.tree.leaves(args)
    got = jax.jit(lambda *a: evaluate(graph, a))(*flat)
    want = jax.tree.leaves(jax.jit(fn)(*args))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    return graph


@jax.custom_vjp
def clipped_sin(x):
    return jnp.sin(x)


clipped_sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (jnp.clip(g * jnp.cos(x), -1, 1),))


def kitchen_sink(params, tokens, images, key):
    """One function touching every primitive family the issue lists."""
    emb = params["emb"][tokens]                                   # gather
    x = jax.nn.relu(emb @ params["w"])                            # custom_jvp (relu), dot
    x = clipped_sin(x)                                            # custom_vjp
    x = jax.checkpoint(lambda h: jnp.tanh(h) * 2.0)(x)           # remat
    x = jax.jit(lambda h: h + 1.0)(x)                             # jit
    x = autoshard.hint(x, P(None, None, None))                    # hint
    noise = jax.random.normal(key, x.shape)                       # random_bits, threefry
    x = jnp.where(x > 0, x, noise)                                # select_n
    x = jnp.concatenate([x[:, :2], x[:, 2:]], axis=1)             # slicing, concatenate
    x = jax.lax.dynamic_update_slice(x, jax.lax.dynamic_slice(x, (0, 1, 0), (2, 1, 8)),
                                     (0, 0, 0))
    x = x + jnp.cumsum(x, axis=1) * 1e-2 + jnp.arange(8.0)        # cumsum, iota
    idx = jnp.argmax(x, axis=-1)                                  # argmax
    counts = jnp.zeros((8,)).at[idx.reshape(-1)].add(1.0)         # scatter-add
    y = jax.lax.conv_general_dilated(images, params["k"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def body(c, row):
        return c * 0.5 + row.sum(), c

    carry, ys = jax.lax.scan(body, jnp.float32(0.0), x.reshape(-1, 8))        # scan
    n, acc = jax.lax.while_loop(lambda s: s[0] < 3, lambda s: (s[0] + 1, s[1] * 1.5),
                                (0, jax.lax.stop_gradient(carry)))           # while
    z = jax.lax.cond(acc > 0, lambda v: v.max(), lambda v: v.min(), ys)       # cond
    loss = (x.astype(jnp.bfloat16).astype(jnp.float32).mean() + y.mean()      # convert
            + counts.max() + z + acc)
    return loss, idx


def sink_args():
    k = jax.random.split(jax.random.key(1), 5)
    params = {"emb": jax.random.normal(k[0], (16, 8)), "w": jax.random.normal(k[1], (8, 8)),
              "k": jax.random.normal(k[2], (3, 3, 2, 4))}
    tokens = jax.random.randint(k[3], (4, 4), 0, 16)
    images = jax.random.normal(k[4], (2, 6, 6, 2))
    return params, tokens, images, jax.random.key(5)


def test_kitchen_sink_forward_lifts_every_primitive_and_reproduces():
    graph = assert_graph_reproduces(kitchen_sink, *sink_args())
    ops = set(graph.op_counts())
    assert not ops & INLINED
    for op in ["gather", "dot_general", "autoshard_hint", "random_bits", "select_n",
               "concatenate", "slice", "dynamic_slice", "dynamic_update_slice", "cumsum",
               "iota", "argmax", "scatter-add", "conv_general_dilated", "scan", "while",
               "cond", "convert_element_type", "reduce_max", "reduce_sum"]:
        assert op in ops, op
    scan = next(n for n, _ in graph.walk() if n.op == "scan")
    (body,) = scan.regions
    assert len(body.inputs) == len(scan.inputs) and len(body.outputs) == len(scan.outputs)
    loop = next(n for n, _ in graph.walk() if n.op == "while")
    assert len(loop.regions) == 2
    branch = next(n for n, _ in graph.walk() if n.op == "cond")
    assert len(branch.regions) == 2
    text = graph.pretty()
    assert "= scan(" in text and "= while(" in text and text.count("graph(") == 1 + sum(
        len(n.regions) for n, _ in graph.walk())


def test_kitchen_sink_train_step_reproduces():
    """The gradient of everything above (custom_vjp backward, remat recomputation, scan
    transpose, scatter/gather transposes) lifts and reproduces too."""
    params, tokens, images, key = sink_args()

    def step(params, tokens, images, key):
        grads = jax.grad(lambda p: kitchen_sink(p, tokens, images, key)[0])(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    graph = assert_graph_reproduces(step, params, tokens, images, key)
    assert "optimization_barrier" in graph.op_counts()   # remat kept as JAX lowers it
    assert "scatter-add" in graph.op_counts()            # gather's transpose


@pytest.mark.parametrize("model", [mlp, gpt, llama, conv, moe, scan_gpt],
                         ids=lambda m: m.__name__.split(".")[-1])
def test_every_model_train_step_reproduces(model):
    graph = assert_graph_reproduces(model.train_step, *example_args(model))
    assert graph.op_counts().get("dot_general", 0) + graph.op_counts().get(
        "conv_general_dilated", 0) > 0


def test_closed_call_is_inlined():
    """closed_call has no public constructor in jax 0.10; rewrite a jit eqn into one."""
    closed = jax.make_jaxpr(lambda x: jax.jit(lambda h: jnp.sin(h) + 1.0)(x) * 2)(jnp.ones(3))
    (call, mul) = closed.jaxpr.eqns
    call = call.replace(primitive=jprims.closed_call_p,
                        params={"call_jaxpr": call.params["jaxpr"]})
    rewritten = jax.extend.core.ClosedJaxpr(closed.jaxpr.replace(eqns=[call, mul]), [])
    graph = lift_jaxpr(rewritten)
    verify(graph)
    assert [n.op for n in graph.nodes] == ["sin", "add", "mul"]
    np.testing.assert_allclose(evaluate(graph, [jnp.ones(3)])[0], (np.sin(1.0) + 1) * 2, rtol=1e-6)


def test_names_sources_and_indexes():
    args = example_args(mlp)
    traced, graph = lift_fn(mlp.train_step, *args)
    assert graph.inputs[0].name == "params['b1']"
    assert "batch['x']" in traced.arg_names and "opt_state[0].mu['w1']" in traced.arg_names
    assert graph.output_names[-1] == "out[2]"
    dots = [n for n, _ in graph.walk() if n.op == "dot_general"]
    assert dots and all(n.source.startswith("tests/models/mlp.py:") for n in dots[:2])
    assert any("transpose(jvp(" in n.name_stack for n in dots)
    x = next(v for v in graph.inputs if v.name == "batch['x']")
    consumers = graph.consumers(x)
    assert [n.op for n in consumers] == ["dot_general", "dot_general"]  # forward, and dW
    consumer = consumers[0]
    out = consumer.outputs[0]
    assert graph.producer(out) is consumer and graph.node_of(out.id) is consumer
    assert graph.producer(x) is None


def test_scan_body_values_are_distinct_and_stacked_axis_recorded():
    _, graph = lift_fn(scan_gpt.train_step, *example_args(scan_gpt))
    scans = [n for n, _ in graph.walk() if n.op == "scan"]
    assert len(scans) >= 2  # forward and backward passes over the layers
    for node in scans:
        assert node.params["length"] == scan_gpt.LAYERS
        xs = node.inputs[node.params["num_consts"] + node.params["num_carry"]:]
        assert all(a.shape[0] == scan_gpt.LAYERS for a in xs)
    ids = [v.id for v in graph.all_values()]
    assert len(ids) == len(set(ids))


def test_literals_and_closed_over_constants():
    table = np.arange(12.0, dtype=np.float32).reshape(3, 4)
    fn = lambda x: x * 2.0 + table  # noqa: E731
    graph = assert_graph_reproduces(fn, jnp.ones((3, 4)))
    mul = next(n for n in graph.nodes if n.op == "mul")
    assert any(isinstance(a, Literal) for a in mul.inputs)
    assert len(graph.constant_values) == 1
    np.testing.assert_array_equal(graph.constants[graph.constant_values[0].id], table)


def test_sharding_constraint_in_user_code_becomes_a_hint():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharding = jax.sharding.NamedSharding(mesh, P("data"))
    fn = lambda x: jax.lax.with_sharding_constraint(x * 2, sharding) + 1  # noqa: E731
    _, graph = lift_fn(fn, jnp.ones((8, 4)))
    (hint,) = [n for n in graph.nodes if n.op == "autoshard_hint"]
    assert hint.params["spec"] == P("data")


def test_explicit_mode_layouts_become_hints_and_leave_the_params():
    """``out_sharding=`` and ``jax.sharding.reshard`` (traced under the explicit view of the
    mesh) are pins; the re-bound primitives carry no layout, so the graph runs under no mesh."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))

    def fn(x, w):
        h = jnp.einsum("bd,df->bf", x, w, out_sharding=P("data", "model"))
        h = jax.sharding.reshard(jnp.tanh(h), P("data", None))
        return (h.reshape(2, 4, 16) + jnp.zeros((2, 4, 1))).sum(0)

    x, w = jnp.arange(64.0).reshape(8, 8) / 64, jnp.ones((8, 16)) / 8
    _, graph = lift_fn(fn, x, w, mesh=mesh)
    hints = [n.params["spec"] for n in graph.nodes if n.op == "autoshard_hint"]
    assert P("data", "model") in hints and P("data", None) in hints
    for node, _ in graph.walk():
        for key in ("sharding", "out_sharding"):
            assert node.params.get(key) is None, (node.op, key)
    with jax.set_mesh(mesh):
        want = jax.jit(fn)(x, w)
    np.testing.assert_allclose(jax.jit(lambda *a: evaluate(graph, a))(x, w)[0], want,
                               rtol=1e-6)


def test_output_may_be_input_or_literal():
    _, graph = lift_fn(lambda x: (x, 3.0), jnp.ones(2))
    assert graph.outputs[0] is graph.inputs[0]
    assert isinstance(graph.outputs[1], Literal)
    assert evaluate(graph, [jnp.ones(2)])[1] == 3.0


def test_verify_rejects_use_before_definition():
    _, graph = lift_fn(lambda x: jnp.sin(x) * 2, jnp.ones(2))
    broken = type(graph)(graph.inputs, graph.outputs, tuple(reversed(graph.nodes)))
    with pytest.raises(autoshard.PlanError, match="before it is defined"):
        verify(broken)
    assert isinstance(graph.nodes[0].outputs[0], Value)

"""Hand-written plans, as a JAX user writes them with PartitionSpecs: data parallel,
FSDP/ZeRO-3 and Megatron tensor parallel (+ data parallel on the other mesh axis)."""

import math

import jax
from jax.sharding import PartitionSpec as P


def batch_axes(mesh, *, exclude=()):
    axes = tuple(a for a in mesh.axis_names if a not in exclude)
    return axes if len(axes) != 1 else axes[0]


def tp_axis(mesh):
    return "model" if "model" in mesh.axis_names else mesh.axis_names[-1]


def mirror_opt_specs(opt_state, param_specs, params):
    """Specs for optimizer state: a leaf whose path ends with a parameter's path and has its
    shape follows that parameter; everything else (step counts) is replicated."""
    by_path = {}
    for (path, spec), leaf in zip(
            jax.tree_util.tree_flatten_with_path(param_specs, is_leaf=lambda x: isinstance(
                x, P))[0], jax.tree_util.tree_leaves(params)):
        by_path[jax.tree_util.keystr(path)] = (spec, leaf.shape)

    def pick(path, leaf):
        text = jax.tree_util.keystr(path)
        for suffix, (spec, shape) in by_path.items():
            if text.endswith(suffix) and leaf.shape == shape:
                return spec
        return P()

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def batch_specs(batch, axes):
    return jax.tree.map(lambda x: P(axes) if axes else P(), batch)


def data_parallel(mesh, params, opt_state, batch):
    axes = batch_axes(mesh)
    return (P(), P(), batch_specs(batch, axes))


def fsdp(mesh, params, opt_state, batch):
    """ZeRO-3: every parameter (and its optimizer state) split along its largest dim that the
    whole mesh divides; the batch split over all devices."""
    axes = batch_axes(mesh)
    n = math.prod(mesh.axis_sizes)

    def spec(leaf):
        dims = sorted(range(leaf.ndim), key=lambda d: -leaf.shape[d])
        for d in dims:
            if leaf.shape[d] % n == 0:
                return P(*([None] * d), axes)
        return P()

    param_specs = jax.tree.map(spec, params)
    return (param_specs, mirror_opt_specs(opt_state, param_specs, params),
            batch_specs(batch, axes))


def megatron(mesh, model, params, opt_state, batch):
    tp = tp_axis(mesh)
    kwargs = {"tp_size": mesh.shape[tp]} if model.__name__.endswith("llama") else {}
    param_specs = model.megatron_specs(params, tp, **kwargs)
    dp = batch_axes(mesh, exclude=(tp,))
    return (param_specs, mirror_opt_specs(opt_state, param_specs, params),
            batch_specs(batch, dp))

"""Save and restore a sharded NNX train state with orbax-checkpoint.

``save(directory, model, optimizer)`` writes ``nnx.state`` of the objects (each process writes
its own shards: orbax's ``StandardCheckpointer``, no gather onto one device). ``restore``
reads it back straight into the layouts a compiled step planned for those objects: the target
is the abstract state of ``create()`` (``nnx.eval_shape``, nothing allocated) with the plan's
``NamedSharding`` on every leaf, so each device reads only its shards. Training resumes with
bit-identical state, which ``tests/test_checkpoint.py`` checks against an uninterrupted run.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import orbax.checkpoint as ocp
from flax import nnx

from autoshard.nnx import NnxFunction, record_shardings


def save(directory: str | os.PathLike, *objects: Any) -> None:
    """Write the state of ``objects`` (modules, optimizers) to ``directory`` (a new path)."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(directory), nnx.state(objects))
    checkpointer.wait_until_finished()


def restore(directory: str | os.PathLike, step: NnxFunction, create: Callable[[], Any],
            argnums: int | Sequence[int]) -> Any:
    """The objects ``create()`` would make (standing for ``step``'s arguments ``argnums``),
    holding the state saved in ``directory``, laid out as ``step``'s plan wants them."""
    graphdef, state, shardings = step.planned_state(create, argnums)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    target = jax.tree_util.tree_unflatten(treedef, [
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, shardings)])
    restored = ocp.StandardCheckpointer().restore(os.path.abspath(directory), target)
    objects = nnx.merge(graphdef, restored)
    record_shardings(objects)
    return objects if len(objects) > 1 else objects[0]

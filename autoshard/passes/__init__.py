"""The passes of a compile, each a function from graph (or jaxpr) to graph plus results.

In the order ``autoshard/planner.py`` calls them:

1. ``trace``       the user's function on abstract arguments -> a closed jaxpr, leaves named
2. ``lift``        jaxpr -> ``ir.Graph`` (calls inlined, loops kept as region nodes)
3. ``pins``        ``in_specs`` / ``out_specs`` / ``autoshard.hint`` / annotations -> hard pins
4. ``rules``       the data-parallel and fully-sharded rules (no search), or:
5. ``problem``     graph -> the strategy problem (``strategies/`` lists each op's choices;
                   ``fusion`` and ``latency`` model what XLA fuses and combines)
6. ``search``      solve it (``autoshard.solver``) -> a choice, never dearer than a ``seeds``
                   plan; ``chosen_plan`` reads the plan off it, ``prediction/`` prices it
                   (time, collectives, memory, alternatives)
7. ``annotations`` the report comparing the user's annotations with the searched plan
8. ``lower``       the plan -> a function that constrains every planned value, for ``jax.jit``

``state`` says which results are updated arguments; ``pipeline/`` holds the pipelined path's
passes (unroll, stage slicing, intra-stage plan, microbatches, the predicted schedule).
"""

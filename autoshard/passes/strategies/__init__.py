"""The strategy catalogue: the registry (``registry.py``) and the rule families that fill it.

Importing the package imports every family, so a reader of ``strategy_rules`` always sees the
complete registry.
"""

from autoshard.passes.strategies import registry  # noqa: F401  (first: the families register)
from autoshard.passes.strategies import contraction, indexing, layout  # noqa: F401

"""The plan cache: a solved plan is stored on disk and reused when nothing it depends on changed.

An entry is keyed by a fingerprint of everything a plan depends on: the lifted graph (structure,
shapes, dtypes, primitive parameters, argument and result paths), the arguments' shardings, the
mesh's axis names and sizes, the hardware profile, the memory budget, the options of
``autoshard.compile`` and the autoshard and jax versions (a new jax can lift the same function
into a different graph). It holds the versioned plan record of ``ir/plan_json.py``.

Entries are never trusted blindly: a file that does not parse, is of another schema version,
was written under another key or does not fit the freshly lifted graph is ignored with a
warning and replaced by a new solve. Writes go to a temporary file in the same directory,
flushed and then renamed over the entry (``os.replace`` is atomic on POSIX), so a reader sees
either the old entry or the whole new one, also with several processes writing at once.

``AUTOSHARD_CACHE_DIR`` sets the directory (default ``$XDG_CACHE_HOME/autoshard`` or
``~/.cache/autoshard``); ``AUTOSHARD_CACHE=0`` or ``compile(..., cache=False)`` bypasses it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoshard.ir.errors import PlanError
from autoshard.ir.graph import Graph
from autoshard.ir.plan import Plan
from autoshard.ir.plan_json import SCHEMA_VERSION, plan_from_json

log = logging.getLogger("autoshard")

ENTRY_FORMAT = "autoshard.plan-cache-entry"


class PlanCacheWarning(UserWarning):
    """A cache entry was unreadable or stale and is being ignored (the plan is solved anew)."""


def default_cache_dir() -> Path:
    configured = os.environ.get("AUTOSHARD_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "autoshard"


def cache_enabled(requested: bool | None) -> bool:
    """``compile(cache=...)``: True / False as given; None follows ``AUTOSHARD_CACHE`` (on unless
    it is ``0``, ``false``, ``no`` or ``off``)."""
    if requested is not None:
        return bool(requested)
    return os.environ.get("AUTOSHARD_CACHE", "1").strip().lower() not in ("0", "false", "no",
                                                                           "off")


@dataclass(frozen=True)
class PlanCache:
    """Plans on disk under ``directory``, one JSON file per key."""

    directory: Path

    @classmethod
    def default(cls) -> PlanCache:
        return cls(default_cache_dir())

    def path(self, key: str) -> Path:
        return self.directory / f"v{SCHEMA_VERSION}" / key[:2] / f"{key}.json"

    def load(self, key: str, graph: Graph, *, in_tree: Any, out_tree: Any,
             graph_digest: str | None = None) -> Plan | None:
        """The cached plan for ``key`` re-attached to ``graph`` (``graph_digest``: its
        fingerprint, if known); None on a miss, and None with a ``PlanCacheWarning`` for an
        entry that cannot be trusted."""
        path = self.path(key)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as err:
            return self._ignore(path, f"cannot be read ({err})")
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as err:
            return self._ignore(path, f"is not valid JSON ({err.msg} at line {err.lineno})")
        if not isinstance(entry, dict) or entry.get("format") != ENTRY_FORMAT:
            return self._ignore(path, "is not an autoshard plan-cache entry")
        if entry.get("key") != key:
            return self._ignore(path, "was written for another key")
        try:
            return plan_from_json(entry.get("plan"), graph, in_tree=in_tree, out_tree=out_tree,
                                  where=f"plan cache entry {path}", graph_digest=graph_digest)
        except PlanError as err:
            return self._ignore(path, f"is stale ({err})")

    def store(self, key: str, record: dict) -> Path:
        """Write a plan's record (``plan_to_json``) under ``key`` atomically; returns the
        entry's path."""
        path = self.path(key)
        text = json.dumps({"format": ENTRY_FORMAT, "key": key, "plan": record}, sort_keys=True)
        atomic_write_text(path, text)
        return path

    def _ignore(self, path: Path, why: str) -> None:
        warnings.warn(f"autoshard: ignoring plan cache entry {path}: it {why}; solving the plan "
                      "again and replacing the entry", PlanCacheWarning, stacklevel=4)
        return None


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that no reader ever sees a partial file: a temporary file in
    the same directory (same file system), flushed to disk, renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem[:12]}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise

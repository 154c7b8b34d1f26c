"""Fast local search on a large reduced problem: tree-block steps under memory prices.

Large cores (thousands of nodes) can have a memory limit many times below the peak of the
cheapest plan, so a plan's quality is decided by *where* memory is saved.
A greedy repair at the worst time saves it wherever it is cheapest per byte there, ignoring the
other overflowing times, and ends far from good plans; and single-node moves (iterated
conditional modes, Besag 1986) stall at once, because a node that leaves its neighbours'
layouts pays resharding on every edge, whereas a tree-block step moves whole connected blocks.

- *Tree-block steps* (Sontag and Jaakkola, "Tree Block Coordinate Descent for MAP in Graphical
  Models", AISTATS 2009): a maximal induced forest of random order (about 80% of the nodes on
  the contest's cores) is optimised exactly by min-sum dynamic programming with every other node
  fixed; never worse than where it starts.
- *Memory prices*: memory gets a price per time step, ``mu[t]`` (Lagrangian relaxation of the
  memory rows; Fisher, "The Lagrangian Relaxation Method for Solving Integer Programming
  Problems", Management Science 1981; the 1st IOPDDL team likewise made the limits soft with
  adaptive penalties). A strategy then costs its own cost plus Σ_t mu[t] · usage_t, computed
  for every strategy at once from prefix sums of ``mu`` over the members' intervals; the priced
  problem has no memory rows, so tree-block steps apply. The prices rise where plans overflow
  and fall when they fit (``priced_search``).
- *Feasible descent*: every priced plan is repaired to fit, then single-node moves that lower
  the true cost and keep every time within the limit (checked exactly against the usage
  profile) are applied.

All decisions depend only on the inputs, the seed and the iteration count, never on the clock,
except the wall-clock stop in contest mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from autoshard.solver.memory import MemoryModel
from autoshard.solver.problem import FORBIDDEN


@dataclass
class _Flat:
    """Every variable member of every reduced node in flat arrays: member r belongs to node
    ``node[r]``, is live on ``[start[r], end[r])``; ``usage`` is the (Σk, Σmembers) sparse
    matrix of each strategy's usage per member (block-diagonal by node); ``offsets`` the
    strategies' offsets per node."""

    node: np.ndarray
    start: np.ndarray
    end: np.ndarray
    usage: sp.csr_matrix
    offsets: np.ndarray


def _flatten(memory: MemoryModel, k: np.ndarray) -> _Flat:
    offsets = np.concatenate([[0], np.cumsum(k)]).astype(np.int64)
    sizes = np.array([len(s) for s in memory.starts], np.int64)
    moff = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    rows, cols, vals = [], [], []
    for j, u in enumerate(memory.usage):
        if not u.size:
            continue
        a, m = np.nonzero(u)
        rows.append(offsets[j] + a)
        cols.append(moff[j] + m)
        vals.append(u[a, m].astype(np.float64))
    total = int(moff[-1])
    if rows:
        usage = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows),
                                                       np.concatenate(cols))),
                              shape=(int(offsets[-1]), total))
    else:
        usage = sp.csr_matrix((int(offsets[-1]), total))
    node = np.repeat(np.arange(len(k)), sizes)
    start = (np.concatenate(memory.starts) if total else np.zeros(0)).astype(np.int64)
    end = (np.concatenate(memory.ends) if total else np.zeros(0)).astype(np.int64)
    return _Flat(node, start, end, usage, offsets)


class LocalSearch:
    """Working state for the local search of one reduced problem: ``costs[j]`` and ``adj[j]``
    (neighbour -> matrix with j's strategies as rows) as in ``search``."""

    def __init__(self, costs, adj, memory: MemoryModel):
        self.costs = [np.asarray(c, np.float64) for c in costs]
        self.adj = adj
        self.nbrs = [np.array(sorted(a), np.int64) for a in adj]
        self.mats = [[a[l] for l in sorted(a)] for a in adj]
        self.memory = memory
        self.k = np.array([len(c) for c in costs], np.int64)
        self.flat = _flatten(memory, self.k)
        self.limit = memory.limit

    # -- memory -----------------------------------------------------------------------------
    def profile(self, choice: np.ndarray) -> np.ndarray:
        return self.memory.profile(choice)

    def prices(self, mu: np.ndarray) -> list[np.ndarray]:
        """Per node, the price of each strategy's memory: Σ_t mu[t] · usage_t."""
        f = self.flat
        prefix = np.concatenate([[0.0], np.cumsum(mu)])
        held = prefix[f.end] - prefix[f.start]
        flat = f.usage @ held
        return [flat[f.offsets[j]:f.offsets[j + 1]] for j in range(len(self.k))]

    def fits_move(self, profile: np.ndarray, j: int, old: int, new: int) -> bool:
        """Whether node j moving old -> new keeps every time within the limit."""
        if self.limit is None:
            return True
        mem = self.memory
        d = mem.usage[j][new] - mem.usage[j][old]
        up = d > 0
        if not up.any():
            return True
        starts, ends = mem.starts[j], mem.ends[j]
        nz = d != 0
        s, e, d = starts[nz], ends[nz], d[nz]
        lo, hi = int(s.min()), int(e.max())
        delta = np.zeros(hi - lo + 1, np.int64)
        np.add.at(delta, s - lo, d)
        np.add.at(delta, e - lo, -d)
        step = np.cumsum(delta)[:-1]
        return not ((step > 0) & (profile[lo:hi] + step > self.limit)).any()

    def apply(self, profile: np.ndarray, j: int, old: int, new: int) -> None:
        mem = self.memory
        d = mem.usage[j][new] - mem.usage[j][old]
        for s, e, x in zip(mem.starts[j], mem.ends[j], d):
            if x:
                profile[s:e] += x

    # -- cost -------------------------------------------------------------------------------
    def cost(self, choice: np.ndarray) -> float:
        """Cost of ``choice`` over the nodes and edges (without presolve's constant)."""
        total = sum(float(c[a]) for c, a in zip(self.costs, choice))
        for j, (nb, ms) in enumerate(zip(self.nbrs, self.mats)):
            for l, m in zip(nb, ms):
                if l > j:
                    total += float(m[choice[j], choice[l]])
        return total

    def local(self, choice: np.ndarray, j: int, extra=None) -> np.ndarray:
        c = self.costs[j] if extra is None else self.costs[j] + extra[j]
        for l, m in zip(self.nbrs[j], self.mats[j]):
            c = c + m[:, choice[l]]
        return c

    def descend(self, choice: np.ndarray, profile: np.ndarray, sweeps: int = 4,
                stop=None) -> tuple[np.ndarray, np.ndarray]:
        """Feasible descent: move single nodes to cheaper strategies whose memory fits; returns
        the improved (choice, profile). ``profile`` must already fit."""
        choice, profile = choice.copy(), profile.copy()
        for _ in range(sweeps):
            changed = 0
            for j in range(len(self.k)):
                if self.k[j] < 2:
                    continue
                c = self.local(choice, j)
                a = int(choice[j])
                better = np.flatnonzero(c < c[a] - 1e-9 * max(1.0, abs(c[a])))
                if not len(better):
                    continue
                for b in better[np.argsort(c[better], kind="stable")]:
                    if c[b] >= FORBIDDEN:
                        break
                    if self.fits_move(profile, j, a, int(b)):
                        self.apply(profile, j, a, int(b))
                        choice[j] = b
                        changed += 1
                        break
            if not changed or (stop is not None and stop()):
                break
        return choice, profile

    # -- tree blocks ------------------------------------------------------------------------
    def forest(self, order: np.ndarray) -> np.ndarray:
        """A maximal induced forest, grown in ``order``: a node joins when its neighbours
        already in lie in distinct trees (union-find), so the nodes in induce no cycle."""
        n = len(self.k)
        parent = np.arange(n)

        def root(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        inside = np.zeros(n, bool)
        for v in order:
            v = int(v)
            if self.k[v] < 2:
                continue
            roots = [root(int(l)) for l in self.nbrs[v] if inside[l]]
            if len(roots) != len(set(roots)):
                continue
            inside[v] = True
            for r in roots:
                parent[r] = v
        return inside

    def tree_step(self, choice: np.ndarray, inside: np.ndarray, extra=None) -> np.ndarray:
        """The exact minimum of cost + ``extra`` over the nodes ``inside`` (an induced forest)
        with every other node at ``choice``: min-sum dynamic programming on each tree (Sontag
        and Jaakkola, "Tree Block Coordinate Descent for MAP in Graphical Models", AISTATS
        2009). Never worse than ``choice`` on that objective."""
        choice = choice.copy()
        n = len(self.k)
        belief = [None] * n
        for v in np.flatnonzero(inside):
            c = self.costs[v] if extra is None else self.costs[v] + extra[v]
            for l, m in zip(self.nbrs[v], self.mats[v]):
                if not inside[l]:
                    c = c + m[:, choice[l]]
            belief[v] = c
        seen = np.zeros(n, bool)
        for r in np.flatnonzero(inside):
            if seen[r]:
                continue
            # breadth-first order of r's tree, with each node's parent and edge matrix
            order, par, mat = [r], [-1], [None]
            seen[r] = True
            q = 0
            while q < len(order):
                v = order[q]
                q += 1
                for l, m in zip(self.nbrs[v], self.mats[v]):
                    if inside[l] and not seen[l]:
                        seen[l] = True
                        order.append(int(l))
                        par.append(v)
                        mat.append(m)  # rows: parent's strategies, columns: l's
            arg = [None] * len(order)
            for i in range(len(order) - 1, 0, -1):
                v, p, m = order[i], par[i], mat[i]
                tot = m + belief[v][None, :]
                best = np.argmin(tot, axis=1)
                arg[i] = best
                belief[p] = belief[p] + tot[np.arange(len(best)), best]
            choice[r] = int(np.argmin(belief[r]))
            for i in range(1, len(order)):
                choice[order[i]] = int(arg[i][choice[par[i]]])
        return choice


def priced_search(search: LocalSearch, choice: np.ndarray, *, rng: np.random.Generator,
                  repair, offer, keep_going, spend=None, tree_steps: int = 2,
                  patience: int = 150, step_div: float = 1e4,
                  decay: float = 0.5) -> np.ndarray:
    """Lagrangian search for plans that fit (the module docstring): from ``choice``, repeat
    ``tree_steps`` tree-block steps on cost + memory prices ``mu``, warm-started from the last
    priced plan. ``mu`` rises by a subgradient step where the plan overflows (by the overflow
    times ``step``: the start's cost per byte-time of overflow over ``step_div``) and falls
    by the factor ``decay`` everywhere when it fits. Every plan is made to fit by
    ``repair(choice) -> choice``, improved by feasible descent and handed to
    ``offer(choice) -> bool`` (True: a new incumbent). Runs while ``keep_going()`` and stops
    after ``patience`` rounds without a new incumbent (then the LNS has the time);
    ``spend()`` is called once per round (deterministic budgets). Returns the last priced plan.

    The defaults take small steps (``step_div`` 1e4), which keep the plans at the edge of the
    limit, and a fast fall (``decay`` 0.5), which suits the tightest limits. Each round starts
    from the last priced plan, not from the plan without memory, since a block the prices pushed
    to small-memory strategies rarely comes back in one tree step."""
    memory, limit = search.memory, search.limit
    n = len(search.k)
    if limit is None:
        return choice
    profile = search.profile(choice)
    over = np.maximum(profile - limit, 0)
    step = (abs(search.cost(choice)) / max(1.0, float(over.sum())) / step_div
            if over.any() else 0.0)
    mu = np.zeros(memory.horizon)
    idle = 0
    while keep_going() and idle < patience:
        if over.any():
            mu += step * over
        else:
            mu *= decay
        prices = search.prices(mu)
        for _ in range(tree_steps):
            choice = search.tree_step(choice, search.forest(rng.permutation(n)), prices)
        profile = search.profile(choice)
        over = np.maximum(profile - limit, 0)
        if over.any() and step == 0.0:
            step = abs(search.cost(choice)) / max(1.0, float(over.sum())) / step_div
        fitted = repair(choice) if over.any() else choice
        fitted, _ = search.descend(fitted, search.profile(fitted), sweeps=2)
        idle = 0 if offer(fitted) else idle + 1
        if spend is not None:
            spend()
    return choice

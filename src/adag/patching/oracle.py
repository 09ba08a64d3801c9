"""The patching oracle: what every localisation method may ask of the model, with forward-pass
accounting.

Methods (AtP verification, the baselines, the false-negative bound) see the model only through
this protocol, so they are tested on a synthetic additive oracle and run unchanged on the real one
(``adag.patching.patch.PatchingOracle``).

Cost accounting (Kramár et al. 2024, §4): one forward pass of one prompt pair is one unit; a batch
of B rows costs B units; a backward pass costs ``BACKWARD_COST`` units.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from adag.errors import AdagError

BACKWARD_COST = 2.0
"""A backward pass counted as this many forward passes (the AtP* paper's convention)."""


class Oracle(Protocol):
    """Patching access to one behaviour (a set of prompt pairs) over ``n_nodes`` nodes."""

    @property
    def n_nodes(self) -> int:
        """Nodes are numbered 0..n_nodes-1."""
        ...

    @property
    def n_pairs(self) -> int:
        """Prompt pairs averaged over; every subset patch costs this many forward passes."""
        ...

    @property
    def cost(self) -> float:
        """Forward passes spent so far (all calls of ``joint``)."""
        ...

    def joint(self, subsets: Sequence[np.ndarray]) -> np.ndarray:
        """For each subset of node indices: the metric change, averaged over the prompt pairs, when
        all nodes of the subset are patched together (shape ``(len(subsets),)``). Adds
        ``len(subsets) * n_pairs`` to ``cost``. An empty subset has effect 0 and costs nothing."""
        ...


class AdditiveOracle:
    """A synthetic oracle for tests: effect(S) = Σ_{i∈S} effects[i] + noise_scale · N(0, |S|)
    (fresh noise per call, from ``seed``)."""

    def __init__(
        self, effects: np.ndarray, *, n_pairs: int = 1, noise_scale: float = 0.0, seed: int = 0
    ) -> None:
        self.effects = np.asarray(effects, dtype=np.float64)
        self._n_pairs = n_pairs
        self.noise_scale = noise_scale
        self._rng = np.random.default_rng(seed)
        self._cost = 0.0

    @property
    def n_nodes(self) -> int:
        return int(self.effects.shape[0])

    @property
    def n_pairs(self) -> int:
        return self._n_pairs

    @property
    def cost(self) -> float:
        return self._cost

    def joint(self, subsets: Sequence[np.ndarray]) -> np.ndarray:
        out = np.zeros(len(subsets))
        for j, s in enumerate(subsets):
            s = np.asarray(s, dtype=np.int64)
            if s.size == 0:
                continue
            self._cost += self._n_pairs
            out[j] = self.effects[s].sum()
            if self.noise_scale:
                out[j] += self.noise_scale * self._rng.normal() * np.sqrt(s.size)
        return out

    def single(self, nodes: np.ndarray) -> np.ndarray:
        return self.joint([np.array([i]) for i in np.asarray(nodes)])


def sparse_effects(
    n: int, k: int, seed: int = 0, *, low: float = 1.0, high: float = 5.0
) -> np.ndarray:
    """Effects for a sparse :class:`AdditiveOracle`: ``n`` nodes, all exactly 0 except ``k`` of
    them (chosen uniformly at random from ``seed``) with magnitude uniform in ``[low, high)`` and a
    random sign."""
    if not 0 <= k <= n:
        raise AdagError(f"k must be in 0..{n}, got {k}")
    rng = np.random.default_rng(seed)
    out = np.zeros(n)
    idx = rng.choice(n, size=k, replace=False)
    out[idx] = rng.choice([-1.0, 1.0], size=k) * rng.uniform(low, high, size=k)
    return out


class CancellationOracle(AdditiveOracle):
    """A synthetic oracle with planted pairwise interactions:

        effect(S) = Σ_{i∈S} effects[i] + Σ_{(i,j) ⊆ S} w_ij + noise_scale · N(0, |S|)

    ``pairs`` are disjoint-or-not node pairs ``(i, j)``; ``weights`` their ``w_ij`` (default
    ``−(effects[i] + effects[j])``: patching both nodes together has no effect at all, however
    large each is alone). Single-node effects are ``effects`` exactly; an estimate built from
    subsets that tend to hold both nodes of a pair (blocks of neighbours, say) misses them. Same
    protocol and cost accounting as :class:`AdditiveOracle` (a non-empty subset costs ``n_pairs``)."""

    def __init__(
        self,
        effects: np.ndarray,
        pairs: Sequence[tuple[int, int]],
        weights: Sequence[float] | np.ndarray | None = None,
        *,
        n_pairs: int = 1,
        noise_scale: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(effects, n_pairs=n_pairs, noise_scale=noise_scale, seed=seed)
        n = self.n_nodes
        p = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if p.size and (p.min() < 0 or p.max() >= n or np.any(p[:, 0] == p[:, 1])):
            raise AdagError(f"interaction pairs must be two different nodes in 0..{n - 1}")
        self.pairs = p
        if weights is None:
            w = -(self.effects[p[:, 0]] + self.effects[p[:, 1]])
        else:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (p.shape[0],):
                raise AdagError(f"need one weight per pair ({p.shape[0]}), got {w.shape}")
        self.weights = w

    def joint(self, subsets: Sequence[np.ndarray]) -> np.ndarray:
        out = super().joint(subsets)
        if not self.pairs.size:
            return out
        for j, s in enumerate(subsets):
            members = np.zeros(self.n_nodes, dtype=bool)
            members[np.asarray(s, dtype=np.int64)] = True
            both = members[self.pairs[:, 0]] & members[self.pairs[:, 1]]
            out[j] += float(self.weights[both].sum())
        return out

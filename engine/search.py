"""Top-k search of document vectors that stay on disk: an exhaustive scan, and a staged search.

Scores are inner products <q, w_i> (times an optional per-document weight, e.g. the exact
gradient norm that turns unit-scale rows back into raw gradients). Both signs come from one
product: proponents are the k highest scores, opponents the k lowest. Results are
:class:`engine.Retrieval` objects (``projected_*`` = these vector scores, estimates of influence).

The staged search is for corpora whose vectors do not fit in memory:

1. coarse: every document's first P principal coordinates (``PCABasis``, fit on a sample of the
   real vectors; a memory-mapped (N, P) float32 matrix) are scanned exhaustively:
   <q, w> ~= <q, mean> + <V^T q, V^T (w - mean)>, where the columns of V are ordered by the
   documents' variance (an energy-ordered prefix);
2. re-rank: the best ``rerank`` per sign are re-scored with their full rows (read from the shards);
3. the caller re-scores the best of those exactly (``engine.rescore``).
Recall of stage 1 + 2 against the exhaustive scan must be measured on the corpus at hand.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .retrieval import Retrieval
from .storage import save_tensors

RERANK_BLOCK = 2048  # full rows read at once while re-ranking (128 MiB of float32 rows at D = 16,384)
CHUNK_ROWS = 65_536  # rows of a memory-mapped matrix multiplied at once (64 MiB of a 256-wide prefix)


class TopK:
    """The k highest and k lowest scores per query, over row chunks that arrive in any order."""

    def __init__(self, queries: int, k: int):
        self.k = int(k)
        self.ids = np.zeros((queries, 0), np.int64)
        self.high = np.zeros((queries, 0), np.float32)
        self.low_ids = np.zeros((queries, 0), np.int64)
        self.low = np.zeros((queries, 0), np.float32)

    def add(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """``scores`` (n, Q) of documents ``ids`` (n,)."""
        s = np.ascontiguousarray(scores.T, dtype=np.float32)
        ids = np.broadcast_to(np.asarray(ids, np.int64), s.shape)
        self.ids, self.high = _keep(np.concatenate([self.ids, ids], 1), np.concatenate([self.high, s], 1), self.k)
        low_ids, neg = _keep(np.concatenate([self.low_ids, ids], 1), np.concatenate([-self.low, -s], 1), self.k)
        self.low_ids, self.low = low_ids, -neg

    def result(self) -> Retrieval:
        """Sorted: proponents by decreasing score, opponents by increasing score; ties by id."""
        pro_ids, pro = _sorted(self.ids, self.high)
        opp_ids, neg = _sorted(self.low_ids, -self.low)
        return Retrieval(pro_ids, pro, opp_ids, -neg)


def _keep(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k highest scores per row; of scores tied at the cut, the lowest ids (deterministic)."""
    width = scores.shape[1]
    if width <= k:
        return ids, scores
    cut = np.partition(scores, width - k, axis=1)[:, width - k]
    kept = np.empty((len(scores), k), np.int64)
    for r, (row, value) in enumerate(zip(scores, cut)):
        above = np.flatnonzero(row > value)
        tied = np.flatnonzero(row == value)
        tied = tied[np.argsort(ids[r, tied], kind="stable")][:k - len(above)]
        kept[r] = np.concatenate([above, tied])
    return np.take_along_axis(ids, kept, 1), np.take_along_axis(scores, kept, 1)


def _sorted(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((ids, -scores), axis=1) if scores.size else np.zeros(scores.shape, np.int64)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)


def _queries(queries) -> np.ndarray:
    if torch.is_tensor(queries):
        queries = queries.detach().cpu().numpy()
    q = np.asarray(queries, dtype=np.float32)
    return np.ascontiguousarray(q[None] if q.ndim == 1 else q)


def scan(chunks: Iterable[tuple[int, np.ndarray]], queries, k: int, weights: np.ndarray | None = None,
         offset: np.ndarray | None = None) -> Retrieval:
    """Exhaustive top-k of both signs of ``(rows @ q + offset) * weight`` over ``chunks`` of
    (first row id, float32 rows)."""
    q = _queries(queries)
    top = TopK(len(q), k)
    for start, rows in chunks:
        scores = np.asarray(rows, np.float32) @ q.T
        if offset is not None:
            scores += offset[None]
        if weights is not None:
            scores *= weights[start:start + len(rows), None]
        top.add(scores, np.arange(start, start + len(rows)))
    return top.result()


def matrix_chunks(matrix: np.ndarray, rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """Row blocks of a (memory-mapped) matrix, as float32."""
    for start in range(0, len(matrix), rows):
        yield start, np.asarray(matrix[start:start + rows], np.float32)


@dataclass
class PCABasis:
    """Principal directions of document vectors: ``mean`` (D,), ``components`` (D, P) orthonormal
    columns in decreasing order of variance, so any first p columns are the best p-dim prefix."""

    mean: np.ndarray
    components: np.ndarray

    @property
    def dims(self) -> int:
        return int(self.components.shape[1])

    @classmethod
    def fit(cls, sample: np.ndarray, dims: int, seed: int = 0) -> PCABasis:
        """Randomised SVD (``torch.svd_lowrank``, seeded) of the centred sample (n, D)."""
        x = torch.from_numpy(np.array(sample, dtype=np.float32))
        mean = x.mean(0)
        x -= mean  # in place: the sample is the largest thing the build holds
        dims = min(int(dims), *x.shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, _, v = torch.svd_lowrank(x, q=min(dims + 16, *x.shape), niter=4)
        return cls(mean.numpy(), np.ascontiguousarray(v[:, :dims].numpy()))

    def transform(self, rows: np.ndarray) -> np.ndarray:
        """(n, P) principal coordinates of (n, D) rows."""
        return (np.asarray(rows, np.float32) - self.mean) @ self.components

    def queries(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(V^T q, <q, mean>): the coarse score is <V^T q, coordinates> + <q, mean>."""
        return queries @ self.components, queries @ self.mean

    def save(self, path: str | os.PathLike) -> None:
        save_tensors({"mean": torch.from_numpy(self.mean), "components": torch.from_numpy(self.components)}, path,
                     {"format": "msif-pca-basis"})

    @classmethod
    def load(cls, path: str | os.PathLike) -> PCABasis:
        from safetensors.numpy import load_file

        stored = load_file(str(path))
        return cls(stored["mean"], stored["components"])


def staged_search(prefix: np.ndarray, basis: PCABasis, full_rows: Callable[[np.ndarray], np.ndarray], queries,
                  k: int, rerank: int, weights: np.ndarray | None = None, clock: dict | None = None) -> Retrieval:
    """Coarse scan of the (N, P) ``prefix`` for ``rerank`` candidates per sign, then their full rows
    (``full_rows(sorted ids) -> (n, D) float32``) re-scored and the best ``k`` per sign kept.
    ``clock`` receives the seconds of each step (``coarse_s``, ``rerank_s``)."""
    started = time.perf_counter()
    q = _queries(queries)
    coarse_q, offset = basis.queries(q)
    coarse = scan(matrix_chunks(prefix), coarse_q, max(k, rerank), weights, offset)
    ids = coarse.candidate_ids()
    middle = time.perf_counter()
    exact = np.empty((len(ids), len(q)), np.float32)  # (n, Q), in blocks: many queries' rows stay bounded
    for start in range(0, len(ids), RERANK_BLOCK):
        exact[start:start + RERANK_BLOCK] = full_rows(ids[start:start + RERANK_BLOCK]) @ q.T
    if weights is not None:
        exact *= weights[ids, None]
    rows = np.arange(len(q))[:, None]

    def best(side_ids: np.ndarray, sign: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query's own candidates re-ranked by their full scores, the best k kept."""
        scores = exact[np.searchsorted(ids, side_ids), rows]  # (Q, m)
        order = np.lexsort((side_ids, -sign * scores), axis=1)[:, :k]
        return np.take_along_axis(side_ids, order, 1), np.take_along_axis(scores, order, 1).astype(np.float32)

    found = Retrieval(*best(coarse.proponent_ids, 1), *best(coarse.opponent_ids, -1))
    if clock is not None:
        clock.update(coarse_s=middle - started, rerank_s=time.perf_counter() - middle)
    return found

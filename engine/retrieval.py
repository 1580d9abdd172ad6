"""Top-k proponents and opponents over projected document gradients, then exact re-scoring.

A projected score <P(u), P(G_doc)> is an *estimate* of the influence <u, G_doc>. Retrieval finds
candidates with it: proponents are the top-k of u, opponents the top-k of -u (the most negative
scores). :func:`rescore` then computes the candidates' exact scores with
:func:`engine.score_documents`. Both kinds stay side by side in :class:`Retrieval`, named
``projected_*`` and ``exact_*``; only ``exact_*`` may be shown as an influence score.

Document ids are row positions in the order vectors were added to the index.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import faiss
import numpy as np
import torch
from torch import nn

from .influence import PreconditionedQuery, measure_documents
from .normalization import NormalizedRanking
from .storage import atomic_path
from .tasks import Task
from .tracking import TrackedLayer

KINDS = ("flat", "ivf")


def _as_float32(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None]
    return np.ascontiguousarray(x, dtype=np.float32)


class GradientIndex:
    """faiss index over projected document vectors, scored by inner product.

    ``kind="flat"``: exact inner product over all vectors (IndexFlatIP), the default.
    ``kind="ivf"``: IndexIVFFlat with METRIC_INNER_PRODUCT for large corpora: vectors are bucketed
    into ``nlist`` clusters (trained by :meth:`train`, or on the first :meth:`add`), and a search
    visits the ``nprobe`` best buckets; ``nprobe = nlist`` is exhaustive. Recall against the flat
    index must be measured for the corpus at hand.
    """

    def __init__(self, dim: int, kind: str = "flat", nlist: int | None = None, nprobe: int = 16):
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose from {list(KINDS)}")
        self.dim = int(dim)
        if kind == "flat":
            self.index = faiss.IndexFlatIP(self.dim)
        else:
            if not nlist or nlist < 1:
                raise ValueError("an ivf index needs nlist >= 1 (number of clusters)")
            quantizer = faiss.IndexFlatIP(self.dim)
            self.index = faiss.IndexIVFFlat(quantizer, self.dim, int(nlist), faiss.METRIC_INNER_PRODUCT)
            self.index.nprobe = min(int(nprobe), int(nlist))

    @classmethod
    def build(cls, vectors, kind: str = "flat", nlist: int | None = None,
              nprobe: int = 16) -> GradientIndex:
        """An index holding ``vectors`` (N, D); for ivf, nlist defaults to ~4 sqrt(N), <= N / 39."""
        vectors = _as_float32(vectors)
        return cls.from_chunks([vectors], vectors.shape[1], len(vectors), kind, nlist, nprobe)

    @classmethod
    def from_chunks(cls, chunks: Iterable, dim: int, total: int, kind: str = "flat", nlist: int | None = None,
                    nprobe: int = 16) -> GradientIndex:
        """An index filled from row chunks (e.g. one memory-mapped shard at a time) of ``total``
        rows; ivf trains on the first ~50 rows per list, then every chunk is added in order."""
        if kind == "ivf" and nlist is None:
            # ~4 sqrt(N) lists, but at least 39 training points per list (faiss's own minimum)
            nlist = max(1, min(int(round(4 * np.sqrt(total))), total // 39))
        index = cls(dim, kind, nlist, nprobe)
        pending, held = [], 0
        for chunk in chunks:
            chunk = _as_float32(chunk)
            if index.is_trained:
                index.add(chunk)
                continue
            pending.append(chunk)
            held += len(chunk)
            if held >= min(total, 50 * (nlist or 1)):
                index.train(np.concatenate(pending))
                for part in pending:
                    index.add(part)
                pending = []
        if pending:
            index.add(np.concatenate(pending))
        return index

    @property
    def kind(self) -> str:
        return "ivf" if isinstance(self.index, faiss.IndexIVF) else "flat"

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def nprobe(self) -> int | None:
        return int(self.index.nprobe) if self.kind == "ivf" else None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.kind != "ivf":
            raise ValueError("nprobe applies to ivf indexes only")
        self.index.nprobe = int(value)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, vectors) -> None:
        """Cluster a sample of the vectors (ivf); a flat index needs no training."""
        vectors = _as_float32(vectors)
        self._check_dim(vectors)
        self.index.train(vectors)

    def add(self, vectors) -> None:
        """Append vectors (N, D); their ids continue from ``ntotal``. Trains an untrained ivf
        index on this first chunk."""
        vectors = _as_float32(vectors)
        self._check_dim(vectors)
        if not self.is_trained:
            self.train(vectors)
        self.index.add(vectors)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (Q, min(k, ntotal)), best first; scores are projected inner products."""
        queries = _as_float32(queries)
        self._check_dim(queries)
        k = min(int(k), self.ntotal)
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        scores, ids = self.index.search(queries, k)
        return scores, ids.astype(np.int64)

    def save(self, path: str | os.PathLike) -> None:
        """faiss.write_index to a temporary file in the same folder, then an atomic rename."""
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))

    @classmethod
    def load(cls, path: str | os.PathLike) -> GradientIndex:
        index = faiss.read_index(str(path))
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{path}: not an inner-product index")
        self = cls.__new__(cls)
        self.dim, self.index = int(index.d), index
        return self

    def _check_dim(self, x: np.ndarray) -> None:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {x.shape}")


@dataclass
class Retrieval:
    """Top-k candidates per query (rows) for both signs of influence.

    ``projected_*`` are estimates <P(u), P(G)> from the index. ``exact_*`` are <u, G> recomputed
    by :func:`rescore` (None until then); only those are influence scores. Proponents are ordered
    by decreasing score, opponents by increasing score (most negative first), by exact scores
    once rescored. Opponent scores carry their real sign (the index searched -u).
    """

    proponent_ids: np.ndarray  # (Q, k) int64
    proponent_projected: np.ndarray  # (Q, k) float32
    opponent_ids: np.ndarray
    opponent_projected: np.ndarray
    proponent_exact: np.ndarray | None = None  # (Q, k) float64
    opponent_exact: np.ndarray | None = None
    proponent_normalized: np.ndarray | None = None  # (Q, k) exact / d(z) when the ranking is normalised
    opponent_normalized: np.ndarray | None = None
    proponent_norms: np.ndarray | None = None  # (Q, k) n(z), the norm the ranking divides by
    opponent_norms: np.ndarray | None = None

    @property
    def is_rescored(self) -> bool:
        return self.proponent_exact is not None

    def _map(self, part) -> Retrieval:
        return Retrieval(**{f.name: None if getattr(self, f.name) is None else part(getattr(self, f.name))
                            for f in fields(self)})

    def head(self, k: int) -> Retrieval:
        """The first k of every row. Over-fetching (retrieve m > k, :func:`rescore`, then
        ``head(k)``) recovers the exact top-k when projected scores are noisy."""
        return self._map(lambda x: x[:, :k])

    def row(self, i: int) -> Retrieval:
        """Query ``i`` alone (one row)."""
        return self._map(lambda x: x[i:i + 1])

    def candidate_ids(self) -> np.ndarray:
        """Every document id retrieved for any query, sorted, once."""
        return np.unique(np.concatenate([self.proponent_ids.ravel(), self.opponent_ids.ravel()]))


def retrieve(query_vectors, index: GradientIndex, k: int) -> Retrieval:
    """Top-k proponents (search u) and opponents (search -u) of projected queries (Q, D)."""
    q = _as_float32(query_vectors)
    pro_scores, pro_ids = index.search(q, k)
    neg_scores, opp_ids = index.search(-q, k)
    return Retrieval(pro_ids, pro_scores, opp_ids, -neg_scores)


def rescore(retrieval: Retrieval, model: nn.Module, task: Task, layers: Sequence[TrackedLayer],
            query: PreconditionedQuery, batches_for: Callable[[Sequence[int]], Iterable[Any]],
            progress: bool = False, ranking: NormalizedRanking | None = None) -> Retrieval:
    """Exact scores <u, G> of the retrieved candidates, rows re-sorted by them.

    ``batches_for(doc_ids)`` must yield batches holding exactly those documents, in that order
    (the caller knows where texts live). Each candidate is scored once for all queries
    (gradient-cosine: divided by the documents' gradient norms). With a normalised ``ranking``
    (``engine.normalization``) rows are sorted by ``exact / d(z)`` instead, kept as ``*_normalized``
    beside the exact scores, with the norms ``n(z)``.
    """
    ids = retrieval.candidate_ids()
    measured = measure_documents(model, task, batches_for([int(i) for i in ids]), layers, query,
                                 progress=progress, metric=ranking.metric if ranking else None)
    exact = measured.scores.numpy()
    if query.normalize_documents:
        exact = exact / np.sqrt(measured.sq_norms.numpy()).clip(min=1e-30)
    if exact.shape != (query.num_queries, len(ids)):
        raise ValueError(f"batches_for yielded {exact.shape[1]} documents for {len(ids)} ids")
    ranked, norms = ranking.scored(ids, measured, exact) if ranking else (exact, None)
    rows = np.arange(exact.shape[0])[:, None]

    def gather(values: np.ndarray | None, doc_ids: np.ndarray) -> np.ndarray | None:  # ids: sorted, unique
        if values is None:
            return None
        return np.broadcast_to(values, exact.shape)[rows, np.searchsorted(ids, doc_ids)]

    pro_order = np.argsort(-gather(ranked, retrieval.proponent_ids), axis=1, kind="stable")
    opp_order = np.argsort(gather(ranked, retrieval.opponent_ids), axis=1, kind="stable")
    pro_ids = np.take_along_axis(retrieval.proponent_ids, pro_order, 1)
    opp_ids = np.take_along_axis(retrieval.opponent_ids, opp_order, 1)
    return replace(retrieval,
                   proponent_ids=pro_ids, opponent_ids=opp_ids,
                   proponent_projected=np.take_along_axis(retrieval.proponent_projected, pro_order, 1),
                   opponent_projected=np.take_along_axis(retrieval.opponent_projected, opp_order, 1),
                   proponent_exact=gather(exact, pro_ids), opponent_exact=gather(exact, opp_ids),
                   proponent_normalized=gather(ranked, pro_ids) if ranking else None,
                   opponent_normalized=gather(ranked, opp_ids) if ranking else None,
                   proponent_norms=gather(norms, pro_ids), opponent_norms=gather(norms, opp_ids))

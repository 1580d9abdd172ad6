"""Candidates and their exact re-scoring.

A projected score <P(u), P(G_doc)> is an *estimate* of the influence <u, G_doc>. The study's index
(``engine.study.index``, ``engine.search``) finds candidates with it: proponents are the highest
scores, opponents the lowest. :func:`rescore` then computes the candidates' exact scores in one
gradient pass. Both kinds stay side by side in :class:`Retrieval`, named ``projected_*`` and
``exact_*``; only ``exact_*`` (and the normalised scores made from them) may be shown as influence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
from torch import nn

from .influence import PreconditionedQuery, measure_documents
from .normalization import NormalizedRanking
from .tasks import Task
from .tracking import TrackedLayer


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

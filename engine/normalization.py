"""Normalised influence: a document's raw score divided by a norm of the document.

Raw influence ``<u, grad l(z)>`` grows with the document's gradient, so in a large corpus the few
documents with huge gradients (garbled, repetitive or unseen text) top every query's ranking. A
normalised ranking orders documents by ``score / d(z)`` with ``d(z) = max(n(z), floor)^power`` and
one of three norms ``n(z)``:

    gradient   |grad l(z)|                                   TrackStar, bergson: unit-normalised gradients
    metric     sqrt(grad l^T (H + d I)^-1 grad l)            RelatIF: the document's norm in the metric of the
                                                             method's document-side inverse (its self-influence)
    whitened   |kept whitened eigen-coordinates of z|        the metric norm of multi-stage as the index
                                                             approximates it (``engine.projection.Whitening``)

``power`` < 1 divides only part of the norm out; ``floor`` (a quantile of the corpus's norms, e.g. the
median) leaves documents with small norms on the raw scale. ``d(z) > 0``, so a normalised score keeps
the raw score's sign: positive still means the document raises the answer's log-likelihood. Zero
norms are guarded: ``d`` is never below ``TINY`` times the corpus's median norm (a document whose
gradient is zero has a zero score, and stays at zero).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .methods import DEFAULT_NORMALIZATION, Method

NORMS = ("gradient", "metric", "whitened")
TINY = 1e-6  # d(z) >= TINY x the corpus median norm: no division by zero, no blow-up of a tiny norm
_SPEC = re.compile(r"(?P<norm>[a-z]+)(\^(?P<power>[0-9.]+))?(@(?P<floor>median|q[0-9]{1,2}))?")


@dataclass(frozen=True)
class Normalization:
    """``score / max(n(z), floor)^power``; ``norm=None`` is raw influence. Written as a spec
    string: ``none``, ``gradient``, ``metric^0.5``, ``whitened@median``, ``gradient^0.5@q25``."""

    norm: str | None = None
    power: float = 1.0
    floor: int | None = None  # percentile of the corpus's norms under which n(z) is raised (50 = median)

    def __post_init__(self):
        if self.norm is not None and self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose from {', '.join(NORMS)}")
        if not 0 < self.power <= 1:
            raise ValueError(f"the power of a normalisation must be in (0, 1], got {self.power:g}")
        if self.floor is not None and not 0 <= self.floor < 100:
            raise ValueError(f"the floor is a percentile in [0, 100), got {self.floor}")

    @classmethod
    def parse(cls, spec: str | Normalization | None) -> Normalization:
        if isinstance(spec, Normalization):
            return spec
        text = (spec or "none").strip().lower()
        if text in ("none", "raw"):
            return cls()
        match = _SPEC.fullmatch(text)
        if match is None:
            raise ValueError(f"normalisation {spec!r} is not NORM[^POWER][@median|@qNN], e.g. gradient, "
                             f"metric^0.5, whitened@median; norms: {', '.join(NORMS)}, or none")
        floor = match["floor"]
        try:
            power = float(match["power"] or 1)
        except ValueError:
            raise ValueError(f"normalisation {spec!r}: {match['power']!r} is not a number") from None
        return cls(match["norm"], power, None if floor is None else 50 if floor == "median" else int(floor[1:]))

    def __str__(self) -> str:
        if self.norm is None:
            return "none"
        power = "" if self.power == 1 else f"^{self.power:g}"
        floor = "" if self.floor is None else "@median" if self.floor == 50 else f"@q{self.floor}"
        return f"{self.norm}{power}{floor}"

    @property
    def is_raw(self) -> bool:
        return self.norm is None

    def describe(self) -> str:
        """In words, for a page or a table."""
        if self.norm is None:
            return "raw influence"
        what = {"gradient": "the gradient norm |∇l(z)|", "metric": "the document's norm in the inverse's metric",
                "whitened": "the whitened norm (kept eigen-coordinates)"}[self.norm]
        power = "" if self.power == 1 else f" to the power {self.power:g}"
        floor = "" if self.floor is None else (" (no less than the corpus median)" if self.floor == 50
                                               else f" (no less than its {self.floor}th percentile)")
        return f"influence divided by {what}{power}{floor}"

    def divisors(self, norms: np.ndarray, corpus: np.ndarray | None = None) -> np.ndarray:
        """d(z) for documents with norms ``norms``; ``corpus``: the norms the floor (and the zero
        guard) are taken from, all documents' where known (default: ``norms`` themselves)."""
        norms = np.asarray(norms, np.float64)
        if self.norm is None:
            return np.ones_like(norms)
        reference = norms if corpus is None else np.asarray(corpus, np.float64)
        median = float(np.median(reference)) if reference.size else 0.0
        low = max(TINY * median, np.finfo(np.float64).tiny)
        if self.floor is not None and reference.size:
            low = max(low, float(np.percentile(reference, self.floor)))
        return np.maximum(norms, low) ** self.power

    def apply(self, scores: np.ndarray, norms: np.ndarray, corpus: np.ndarray | None = None) -> np.ndarray:
        """Normalised scores (..., documents): ``scores / d(z)``, the sign kept."""
        return np.asarray(scores, np.float64) / self.divisors(norms, corpus)


DEFAULT = Normalization.parse(DEFAULT_NORMALIZATION)  # what msif query and the app rank by unless told otherwise


@dataclass
class NormalizedRanking:
    """A normalisation bound to where one study's document norms come from."""

    normalization: Normalization
    norms: Callable[[np.ndarray, Any], np.ndarray]  # n(z) of documents ``ids`` from one scoring pass's measures
    reference: np.ndarray | None = None  # every document's n(z), where stored: the floor and the zero guard
    metric: Any = None  # the engine.DocumentMetric a scoring pass must measure (``metric`` norms)

    def scored(self, ids: np.ndarray, measured, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(normalised scores, n(z)) of documents ``ids`` whose raw ``scores`` (..., ids) were measured."""
        norms = np.asarray(self.norms(np.asarray(ids), measured), np.float64)
        return self.normalization.apply(scores, norms, self.reference), norms


def search_weights(m: Method, norm: Normalization, vectors: str, gradient_norms: np.ndarray,
                   whitened_norms: np.ndarray) -> np.ndarray | None:
    """Per-document weights (float32) of the index's scores of ``vectors`` for method ``m`` ranked by
    ``norm``, from every document's exact gradient norm and whitened norm: projected rows are
    unit-scale (times the exact norm for raw gradients); a normalised ranking divides by the index's
    estimate of d(z). None: unweighted. The index stage folds its default ranking's into a code scan."""
    gradient = np.asarray(gradient_norms).astype(np.float64)
    # whitened rows are raw-scale: cosine divides by the exact norm; projected rows (an ablation)
    # are stored unit-scale: raw scores multiply by it
    if vectors == "projected":
        scale = None if m.unit else gradient
    else:
        scale = 1.0 / np.maximum(gradient, 1e-30) if m.unit else None
    if norm.is_raw:
        return None if scale is None else scale.astype(np.float32)
    whitened = norm.norm == "whitened" or (norm.norm == "metric" and m.metric_is_pretrained)
    estimate = np.asarray(whitened_norms).astype(np.float64) if whitened else gradient
    weights = 1.0 / norm.divisors(estimate, estimate)
    return (weights if scale is None else scale * weights).astype(np.float32)

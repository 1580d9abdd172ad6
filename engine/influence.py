"""Influence scores: precondition the query gradient once, then dot it with document gradients.

All inverses act on the query side (they are symmetric), so a score is always ``<u, G_doc>`` summed
over layers, with ``u`` per method:

    multi-stage         u = alpha (H_pt + lambda I)^-1 (H_ft + alpha I)^-1 grad L_q(theta_ft)
    pt-inverse-dropped  u = alpha (H_ft + alpha I)^-1 grad L_q(theta_ft)
    single-stage        u = (H_ft + lambda I)^-1 grad L_q(theta_ft)
    gradient-dot        u = grad L_q(theta_ft)
    gradient-cosine     u = grad L_q / |grad L_q|, and documents are normalised too

Here L_q = -log p(answer | prompt), so a score is the change of the answer's *log-likelihood*
when the document is upweighted: positive = proponent, negative = opponent.
Multi-stage scores expect G_doc at theta_pt (pretraining documents); single-stage at theta_ft.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .curvature import LayerFactors, get_strategy, relative_damping
from .factors import Factors
from .gradients import capture, per_sequence
from .methods import FINETUNED, METHODS, MULTI_STAGE, PRETRAINED
from .methods import method as method_spec
from .tasks import Task
from .text import shortest_first
from .tracking import TrackedLayer


@dataclass
class ScoreArguments:
    """Every knob of a scoring run; saved beside the scores it produced."""

    method: str = MULTI_STAGE
    alpha: float | None = None  # fine-tuning proximity strength: (H_ft + alpha I)
    damping: float | None = None  # absolute lambda; None = damping_factor * mean eigenvalue, per layer
    damping_factor: float = 0.1


@dataclass
class PreconditionedQuery:
    """Per-layer vectors u (Q, out, in[+1]) with score = sum_layers <u, G_doc>."""

    vectors: dict[str, torch.Tensor]
    method: str
    damping: dict[str, float] = field(default_factory=dict)  # lambda actually used, per layer
    alpha: float | None = None

    @property
    def normalize_documents(self) -> bool:
        return method_spec(self.method).unit

    @property
    def num_queries(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def select(self, index) -> PreconditionedQuery:
        return PreconditionedQuery({k: v[index] for k, v in self.vectors.items()},
                                   self.method, self.damping, self.alpha)


def _inverse(factors: Factors, name: str, v: torch.Tensor, damping: float) -> torch.Tensor:
    return get_strategy(factors.strategy).precondition(factors.layers[name], v, damping)


def layer_damping(strategy: str, layer: LayerFactors, args: ScoreArguments) -> float:
    """lambda of one layer (its factors under ``strategy``) as ``precondition`` uses it."""
    if args.damping is not None:
        return float(args.damping)
    return relative_damping(get_strategy(strategy), layer, args.damping_factor)


def damping_values(factors: Factors, args: ScoreArguments) -> dict[str, float]:
    """lambda per layer as ``precondition`` uses it with these factors."""
    return {name: layer_damping(factors.strategy, factors.layers[name], args) for name in factors.layers}


def precondition(query_grads: dict[str, torch.Tensor], args: ScoreArguments,
                 pt_factors: Factors | None = None, ft_factors: Factors | None = None,
                 ) -> PreconditionedQuery:
    """Turn query gradients (Q, out, in[+1]) per layer into the vectors u of ``args.method``: its
    inverses (``engine.methods``) applied in order, alpha (H + alpha I)^-1 or (H + lambda I)^-1."""
    spec = method_spec(args.method)
    if not spec.is_influence:
        raise ValueError(f"{args.method} is a baseline, not an influence method; choose from {list(METHODS)}")
    if spec.needs_alpha and (args.alpha is None or args.alpha <= 0):
        raise ValueError(f"{args.method} needs the fine-tuning proximity alpha > 0, got {args.alpha}")
    factors = {PRETRAINED: pt_factors, FINETUNED: ft_factors}
    for stage in spec.factors:
        if factors[stage] is None:
            raise ValueError(f"{args.method} needs the {stage} model's factors")
    vectors, used = {}, {}
    for name, u in query_grads.items():
        for inverse in spec.inverses:
            f = factors[inverse.stage]
            if inverse.damping == "alpha":
                u = args.alpha * _inverse(f, name, u, args.alpha)
            else:
                used[name] = layer_damping(f.strategy, f.layers[name], args)
                u = _inverse(f, name, u, used[name])
        vectors[name] = u
    if spec.unit:
        norms = torch.sqrt(sum(v.flatten(1).square().sum(1) for v in vectors.values())).clamp_min(1e-30)
        vectors = {k: v / norms.view(-1, 1, 1) for k, v in vectors.items()}
    return PreconditionedQuery(vectors, args.method, used, args.alpha if spec.needs_alpha else None)


def score_gradients(query: PreconditionedQuery, doc_grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scores (Q, N) against documents whose gradients (N, out, in[+1]) are already in memory."""
    scores = sum(torch.einsum("qoi,noi->qn", query.vectors[k].to(g), g) for k, g in doc_grads.items())
    if query.normalize_documents:
        norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in doc_grads.values()))
        scores = scores / norms.clamp_min(1e-30)
    return scores


@dataclass(frozen=True)
class DocumentMetric:
    """A document's squared norm in the metric of an inverse, ``scale <G, (H + d I)^-1 G>`` summed
    over layers: its self-influence under that preconditioner (RelatIF's denominator, squared)."""

    factors: Factors
    damping: dict[str, float]  # d per layer
    scale: float = 1.0

    def sq_norms(self, name: str, g_doc: torch.Tensor) -> torch.Tensor:
        """(B,) for one layer's per-document gradients (B, out, in[+1]), in the eigenbasis of H:
        sum (Q_S^T G Q_A)^2 / (eigenvalues + d)."""
        strategy, lf, d = get_strategy(self.factors.strategy), self.factors.layers[name], self.damping[name]
        rotated = strategy.to_eigenbasis(lf, g_doc).square()
        lam = strategy.eigenvalues(lf)
        weights = 1.0 / (lam.to(rotated) + d) if lam is not None else torch.full_like(rotated[0], 1.0 / d)
        return self.scale * (rotated * weights).flatten(1).sum(1)


def document_metric(args: ScoreArguments, pt_factors: Factors | None = None,
                    ft_factors: Factors | None = None) -> DocumentMetric | None:
    """The inverse each method applies on its documents' side (``engine.methods``: its last one),
    whose metric is the documents' RelatIF norm: (H_pt + lambda I)^-1 for multi-stage,
    (H_ft + lambda I)^-1 for single-stage, alpha (H_ft + alpha I)^-1 for pt-inverse-dropped; None
    (the identity) for the gradient methods."""
    inverse = method_spec(args.method).metric
    if inverse is None:
        return None
    factors = pt_factors if inverse.stage == PRETRAINED else ft_factors
    if inverse.damping == "alpha":
        return DocumentMetric(factors, dict.fromkeys(factors.layers, float(args.alpha)), float(args.alpha))
    return DocumentMetric(factors, damping_values(factors, args))


@dataclass
class DocumentScores:
    """One gradient pass over documents: raw scores and the documents' norms."""

    scores: torch.Tensor  # (Q, N) <u, G>, float64 on the CPU
    sq_norms: torch.Tensor  # (N,) |G|^2
    metric_sq_norms: torch.Tensor | None = None  # (N,) <G, (H + d I)^-1 G> when a metric was given ((M, N): M metrics)


def measure_documents(model: nn.Module, task: Task, loader: Iterable[Any], layers: Sequence[TrackedLayer],
                      query: PreconditionedQuery, progress: bool = True,
                      metric: DocumentMetric | Sequence[DocumentMetric] | None = None) -> DocumentScores:
    """Raw scores (Q, N) of every document in ``loader`` and its norms (``metric``: one metric, or
    several measured in the same pass): one gradient pass, shared by all queries. Per layer and
    batch: G_b = sum_t g_bt a_bt^T, then one matmul against all Q vectors; no loop over (query,
    document) pairs."""
    metrics = () if metric is None else (metric,) if isinstance(metric, DocumentMetric) else tuple(metric)
    columns, sq_norms, metric_norms, positions = [], [], [], []
    for batch, rows in shortest_first(tqdm(loader, desc="scoring", disable=not progress, unit="batch", leave=False)):
        positions.extend(rows)
        acts, grads, _ = capture(model, task, batch, layers)
        scores, sq_norm, metric_norm = 0.0, 0.0, [0.0] * len(metrics)
        for name, a in acts.items():
            g_doc = per_sequence(grads[name], a)
            scores = scores + query.vectors[name].to(g_doc).flatten(1) @ g_doc.flatten(1).T
            sq_norm = sq_norm + g_doc.flatten(1).square().sum(1)
            metric_norm = [total + m.sq_norms(name, g_doc) for total, m in zip(metric_norm, metrics)]
        columns.append(scores.detach().double().cpu())
        sq_norms.append(sq_norm.detach().double().cpu())
        metric_norms.append(torch.stack([n.detach().double().cpu() for n in metric_norm])
                            if metrics else torch.zeros(0, len(sq_norm), dtype=torch.float64))
        del acts, grads, g_doc  # one batch's captures in memory at a time
    if not columns:
        columns, sq_norms = [torch.zeros(query.num_queries, 0, dtype=torch.float64)], [torch.zeros(0)]
        metric_norms = [torch.zeros(len(metrics), 0, dtype=torch.float64)]
    back = torch.as_tensor(positions, dtype=torch.long).argsort() if positions else slice(None)  # input order
    stacked = torch.cat(metric_norms, 1)[:, back]
    return DocumentScores(torch.cat(columns, 1)[:, back], torch.cat(sq_norms).double()[back],
                          None if metric is None else stacked[0] if isinstance(metric, DocumentMetric) else stacked)


def score_documents(model: nn.Module, task: Task, loader: Iterable[Any],
                    layers: Sequence[TrackedLayer], query: PreconditionedQuery,
                    progress: bool = True) -> torch.Tensor:
    """Scores (Q, N) of every document in ``loader`` (gradient-cosine: divided by the documents'
    gradient norms); see :func:`measure_documents`."""
    measured = measure_documents(model, task, loader, layers, query, progress)
    if query.normalize_documents:
        return measured.scores / measured.sq_norms.sqrt().clamp_min(1e-30)
    return measured.scores

"""The ranking methods: one frozen table of what each computes and needs; no torch, so that a
command line can list them cheaply. Nothing else in the project compares method names.

Influence methods score ``<u, grad l(z)>`` with a preconditioned query ``u`` (``engine.influence``);
baselines rank by similarity and carry no sign of influence (``engine.baselines``).
"""

from __future__ import annotations

from dataclasses import dataclass

# how the factor sets every method preconditions with may be held while serving (stored float32)
FACTOR_PRECISIONS = ("float32", "bfloat16", "float16")

PRETRAINED, FINETUNED = "pretrained", "finetuned"  # the two stages' models (and their factors)


@dataclass(frozen=True)
class Inverse:
    """One damped inverse applied to the query: ``(H_stage + d I)^-1``, with d = lambda (the study's
    damping) or alpha (the fine-tuning proximity, then also scaled by alpha)."""

    stage: str  # PRETRAINED | FINETUNED: whose factors
    damping: str  # "lambda" | "alpha"


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    inverses: tuple[Inverse, ...] = ()  # applied to grad L_q in this order; () for baselines and gradients
    documents_at: str | None = PRETRAINED  # the model documents are scored at; None: a baseline
    vectors: str | None = None  # the index's vectors it is served from ("whitened"); None: exhaustive
    unit: bool = False  # query and documents unit-normalised (cosine)
    similarity: str | None = None  # a baseline's similarity: "lexical" (BM25) | "representation"

    @property
    def is_baseline(self) -> bool:
        return self.documents_at is None

    @property
    def is_influence(self) -> bool:
        return not self.is_baseline

    @property
    def indexed(self) -> bool:
        return self.vectors is not None

    @property
    def normalizable(self) -> bool:
        """Takes a normalised ranking (``engine.normalization``); cosine is one already."""
        return self.is_influence and not self.unit

    @property
    def needs_alpha(self) -> bool:
        return any(inv.damping == "alpha" for inv in self.inverses)

    @property
    def factors(self) -> tuple[str, ...]:
        """The stages whose factors the preconditioner needs."""
        return tuple(dict.fromkeys(inv.stage for inv in self.inverses))

    @property
    def metric_is_pretrained(self) -> bool:
        """The documents' side is (H_pt + lambda I)^-1, whose metric norm the whitened norm estimates."""
        return self.metric == Inverse(PRETRAINED, "lambda")

    @property
    def metric(self) -> Inverse | None:
        """The inverse on the documents' side, whose metric gives their RelatIF norm: the last one
        applied (the identity, None, for the gradient methods)."""
        return self.inverses[-1] if self.inverses else None


TABLE = (
    Method("multi-stage", "Bao et al.: fine-tuned query gradient through (H_ft + αI)⁻¹ and (H_pt + λI)⁻¹",
           (Inverse(FINETUNED, "alpha"), Inverse(PRETRAINED, "lambda")), PRETRAINED, "whitened"),
    Method("pt-inverse-dropped", "multi-stage without the pretraining inverse (an ablation)",
           (Inverse(FINETUNED, "alpha"),), PRETRAINED, "whitened"),
    Method("single-stage", "documents treated as training data of the fine-tuned model (H_ft only)",
           (Inverse(FINETUNED, "lambda"),), FINETUNED),
    Method("gradient-dot", "raw gradient inner product (no curvature)", (), PRETRAINED, "whitened"),
    Method("gradient-cosine", "cosine of raw gradients", (), PRETRAINED, "whitened", unit=True),
    Method("representation", "cosine of mean hidden states (baseline)", documents_at=None,
           similarity="representation"),
    Method("bm25", "lexical overlap with prompt + answer (baseline)", documents_at=None, similarity="lexical"),
)
BY_NAME = {m.name: m for m in TABLE}
MULTI_STAGE = "multi-stage"  # the paper's method: the default, and the one whose damping the whitened index uses
RECORDS_METHOD = "single-stage"  # fine-tuning records are the fine-tuned model's own training data
COMPARED = ("multi-stage", "single-stage", "gradient-dot", "pt-inverse-dropped", "bm25")  # the app's comparison
# Every indexed method is served from the whitened eigen-coordinates: <u, G> for any query u. On five
# 30k haystacks they found the exact top 10 of gradient-dot and pt-inverse-dropped far better than the
# Kronecker projection did (docs/vector_storage.md), so the projection is no longer searched.
# The queries a study's index build measures its recall with, per kind of vector searched:
PROBES = {"whitened": MULTI_STAGE}
# The methods whose query vectors the coarse basis is fit on: the default's alone. On seed 3's 30k
# haystack, a basis fit on every indexed method's queries served the default ranking at MRR@10 0.687
# against 0.710, and gradient-dot's at 0.582 against 0.611 (docs/vector_storage.md).
BASIS_QUERIES = {"whitened": (MULTI_STAGE,)}
ALL_METHODS = tuple(BY_NAME)
METHODS = tuple(m.name for m in TABLE if m.is_influence)
BASELINES = tuple(m.name for m in TABLE if m.is_baseline)
DESCRIPTIONS = {m.name: m.description for m in TABLE}

# What influence rankings divide by unless told otherwise (``engine.normalization``): chosen by the
# multi-seed haystack benchmark (benchmarks/normalization.py, docs/normalization.md).
DEFAULT_NORMALIZATION = "gradient"


def method(name: str) -> Method:
    """The method called ``name``, or a ValueError that lists the known ones."""
    if name not in BY_NAME:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(ALL_METHODS)}")
    return BY_NAME[name]


def check_method(name: str) -> str:
    """``name`` if it is a known method (see :func:`method`)."""
    return method(name).name

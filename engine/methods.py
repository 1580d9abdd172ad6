"""The ranking methods by name, with what each computes; no torch, so a CLI can list them cheaply.

Influence methods (``engine.influence``) score ``<u, grad l(z)>`` with a preconditioned query
``u``; baselines (``engine.baselines``) rank by similarity and carry no sign of influence.
"""

from __future__ import annotations

METHODS = ("multi-stage", "pt-inverse-dropped", "single-stage", "gradient-dot", "gradient-cosine")
BASELINES = ("representation", "bm25")
ALL_METHODS = METHODS + BASELINES

# What influence rankings divide by unless told otherwise (``engine.normalization``): chosen by the
# multi-seed haystack benchmark (benchmarks/normalization.py, docs/normalization.md).
DEFAULT_NORMALIZATION = "none"

DESCRIPTIONS = {
    "multi-stage": "Bao et al.: fine-tuned query gradient through (H_ft + αI)⁻¹ and (H_pt + λI)⁻¹",
    "single-stage": "documents treated as training data of the fine-tuned model (H_ft only)",
    "pt-inverse-dropped": "multi-stage without the pretraining inverse (an ablation)",
    "gradient-dot": "raw gradient inner product (no curvature)",
    "gradient-cosine": "cosine of raw gradients",
    "representation": "cosine of mean hidden states (baseline)",
    "bm25": "lexical overlap with prompt + answer (baseline)",
}


def check_method(method: str) -> str:
    """``method`` if it is known, else a ValueError that lists the known ones."""
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")
    return method

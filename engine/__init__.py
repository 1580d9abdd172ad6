"""MSIF engine: EK-FAC curvature and multi-stage influence for fine-tuned language models.

Typical use (see README.md)::

    layers = find_tracked_layers(model)
    factors = fit_factors(model, LanguageModelingTask(), loader, layers, FactorArguments())
    q = precondition(sequence_gradients(ft_model, task, query_batch, ft_layers),
                     ScoreArguments(method="multi-stage", alpha=1.0), pt_factors, ft_factors)
    scores = score_documents(pt_model, task, doc_loader, pt_layers, q)

Names are imported from their modules on first use (PEP 562), so that light modules such as
``engine.methods`` and ``engine.study.layout`` can be read without importing torch (``msif --help``).
"""

from .lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "attribution": ["TokenAttribution", "attribute_tokens"],
    "baselines": ["BM25", "bm25_tokenize", "cosine_similarity", "pooled_representations",
                  "representation_similarity"],
    "curvature": ["STRATEGIES", "LayerFactors", "get_strategy"],
    "factors": ["FactorArguments", "FactorMismatchError", "Factors", "fit_factors", "model_fingerprint"],
    "gradients": ["capture", "flatten", "sequence_gradients", "stack_gradients"],
    "influence": ["DocumentMetric", "DocumentScores", "PreconditionedQuery", "ScoreArguments", "damping_values",
                  "document_metric", "measure_documents", "precondition", "score_documents", "score_gradients"],
    "methods": ["METHODS"],
    "normalization": ["NORMS", "Normalization"],
    "projection": ["KroneckerProjector", "ProjectedDocuments", "Whitening", "gradient_sq_norms",
                   "iter_projected_documents", "project_documents"],
    "retrieval": ["Retrieval", "rescore"],
    "tasks": ["ClassificationTask", "LanguageModelingTask", "Task"],
    "text": ["encode_document_batches", "encode_documents", "encode_prompt_answer"],
    "tracking": ["TrackedLayer", "find_tracked_layers"],
}

__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

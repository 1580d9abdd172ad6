"""MSIF engine: EK-FAC curvature and multi-stage influence for fine-tuned language models.

Typical use (see README.md)::

    layers = find_tracked_layers(model)
    factors = fit_factors(model, LanguageModelingTask(), loader, layers, FactorArguments())
    q = precondition(sequence_gradients(ft_model, task, query_batch, ft_layers),
                     ScoreArguments(method="multi-stage", alpha=1.0), pt_factors, ft_factors)
    scores = score_documents(pt_model, task, doc_loader, pt_layers, q)
"""

__version__ = "0.1.0"

from .attribution import TokenAttribution, attribute_tokens  # noqa: E402
from .curvature import STRATEGIES, LayerFactors, get_strategy  # noqa: E402
from .factors import FactorArguments, FactorMismatchError, Factors, fit_factors, model_fingerprint  # noqa: E402
from .gradients import capture, flatten, sequence_gradients, stack_gradients  # noqa: E402
from .influence import (METHODS, PreconditionedQuery, ScoreArguments, damping_values, precondition,  # noqa: E402
                        score_documents, score_gradients)
from .tasks import ClassificationTask, LanguageModelingTask, Task  # noqa: E402
from .text import encode_document_batches, encode_documents, encode_prompt_answer  # noqa: E402
from .tracking import TrackedLayer, find_tracked_layers  # noqa: E402
from .projection import (KroneckerProjector, ProjectedDocuments, gradient_sq_norms,  # noqa: E402
                         iter_projected_documents, project_documents, project_gradients)
from .retrieval import GradientIndex, Retrieval, rescore, retrieve  # noqa: E402
from .baselines import (BM25, bm25_tokenize, cosine_similarity, pooled_representations,  # noqa: E402
                        representation_similarity)

__all__ = [
    "FactorArguments", "FactorMismatchError", "Factors", "LayerFactors", "METHODS", "STRATEGIES",
    "ClassificationTask", "LanguageModelingTask", "PreconditionedQuery", "ScoreArguments", "Task",
    "TokenAttribution", "TrackedLayer", "attribute_tokens", "capture", "encode_documents",
    "encode_document_batches", "encode_prompt_answer", "find_tracked_layers", "fit_factors", "flatten", "get_strategy",
    "damping_values", "model_fingerprint", "precondition", "score_documents", "score_gradients", "sequence_gradients",
    "stack_gradients",
    "KroneckerProjector", "ProjectedDocuments", "gradient_sq_norms", "iter_projected_documents",
    "project_documents", "project_gradients", "GradientIndex", "Retrieval", "rescore", "retrieve",
    "BM25", "bm25_tokenize", "cosine_similarity", "pooled_representations",
    "representation_similarity",
]

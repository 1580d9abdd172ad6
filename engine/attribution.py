"""Token-level attribution: where in a document (and in the answer) the influence comes from.

A layer's sequence gradient is G = sum_t g_t a_t^T, so <u, G> = sum_t g_t^T u a_t: each document
token t contributes g_t^T u a_t, and the per-layer sums add up to the total score.
On the answer side, influence is linear in the query gradient, so scoring the gradient of each
answer token's loss separately (``LanguageModelingTask.split_targets``) splits the total score
over answer tokens. Passing those per-token vectors here gives the answer-token x document-token map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .gradients import capture
from .influence import PreconditionedQuery
from .tasks import Task
from .tracking import TrackedLayer


@dataclass
class TokenAttribution:
    """Contributions of one batch of documents to Q queries' scores."""

    token_scores: torch.Tensor  # (Q, B, T): per document token, summed over layers
    layer_scores: torch.Tensor  # (Q, B, L): per tracked layer, summed over tokens
    layer_names: list[str]

    @property
    def scores(self) -> torch.Tensor:
        """(Q, B) totals; equal to ``score_documents`` on the same documents."""
        return self.layer_scores.sum(-1)


def attribute_tokens(model: nn.Module, task: Task, batch: Any, layers: Sequence[TrackedLayer],
                     query: PreconditionedQuery, chunk: int = 8) -> TokenAttribution:
    """Per-token and per-layer contributions of each document in ``batch`` to each query score.

    Queries are processed ``chunk`` at a time to bound the (chunk, B, T, out) intermediate.
    """
    acts, grads, _ = capture(model, task, batch, layers)
    first = next(iter(acts.values()))
    n_q, (n_b, n_t) = query.num_queries, first.shape[:2]
    token_scores = first.new_zeros(n_q, n_b, n_t)
    layer_scores = first.new_zeros(n_q, n_b, len(layers))
    norms = None
    if query.normalize_documents:
        norms = torch.sqrt(sum(torch.einsum("bto,bti->boi", grads[n], a).flatten(1).square().sum(1)
                               for n, a in acts.items())).clamp_min(1e-30)
    for j, layer in enumerate(layers):
        a, g = acts[layer.name], grads[layer.name]
        u = query.vectors[layer.name].to(a)
        for start in range(0, n_q, chunk):
            # contribution[q, b, t] = g_bt^T u_q a_bt
            ua = torch.einsum("qoi,bti->qbto", u[start:start + chunk], a)
            contrib = (ua * g.unsqueeze(0)).sum(-1)
            if norms is not None:
                contrib = contrib / norms.view(1, -1, 1)
            token_scores[start:start + chunk] += contrib
            layer_scores[start:start + chunk, :, j] = contrib.sum(-1)
    return TokenAttribution(token_scores.detach().cpu(), layer_scores.detach().cpu(),
                            [layer.name for layer in layers])

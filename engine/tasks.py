"""Tasks: how a batch becomes per-sequence losses.

Every loss here is a *sum* over the sequence's scored tokens, so a per-sequence gradient is the
``grad l(z)`` of the influence formulas (README, "The method in one formula") and the Fisher
``E[vec G vec G^T]`` is that of the mean over sequences.
With ``sample=True`` the targets are drawn from the model's own predictive distribution (the
true Fisher, equal to the Gauss-Newton matrix for softmax cross-entropy); otherwise the data's
own targets are used (empirical Fisher / real gradients).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .tracking import upcast

IGNORE = -100


def _sampled_targets(logits: torch.Tensor, keep: torch.Tensor, generator) -> torch.Tensor:
    """One label per position drawn from softmax(logits), by inverse CDF.

    One uniform number and a binary search per position: an order of magnitude faster than
    ``torch.multinomial``, which draws one exponential per vocabulary entry.
    """
    cdf = torch.softmax(upcast(logits), dim=-1).cumsum_(dim=-1)
    u = torch.rand(keep.shape + (1,), generator=generator, device=cdf.device, dtype=cdf.dtype)
    drawn = torch.searchsorted(cdf, u * cdf[..., -1:], right=True).squeeze(-1)
    drawn = drawn.clamp_max_(logits.shape[-1] - 1)
    return torch.where(keep, drawn, torch.full_like(drawn, IGNORE))


_OUTPUTS_ONLY: ContextVar[bool] = ContextVar("msif_outputs_only", default=False)


@contextmanager
def outputs_only() -> Iterator[None]:
    """Within the block, losses are only differentiated to tracked layers' outputs (``capture``):
    no parameter outside them needs a gradient, which lets the LM head's loss be fused."""
    token = _OUTPUTS_ONLY.set(True)
    try:
        yield
    finally:
        _OUTPUTS_ONLY.reset(token)


FUSED_HEAD_TYPES = ("gpt_neox", "gpt2", "llama", "mistral", "qwen2")  # logits = lm_head(base model output)
HEAD_CHUNK_ELEMENTS = 2**22  # logits held at once by the fused head loss (16 MiB in float32)


class _FusedHeadLoss(torch.autograd.Function):
    """Cross-entropy of ``hidden @ W^T (+ b)`` per row, with its gradient with respect to ``hidden``
    computed in the same pass, a few rows at a time: the (rows, vocabulary) logits, their softmax and
    their gradient never exist whole, and no weight gradient is formed. ``u`` (rows,) given: targets
    are drawn from the model's distribution by inverse CDF (as ``_sampled_targets``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, u):
        rows, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, HEAD_CHUNK_ELEMENTS // vocab)
        losses = torch.empty(rows, dtype=upcast(hidden[:0]).dtype, device=hidden.device)
        grad = torch.empty_like(hidden)
        weight_t = weight.t()
        for start in range(0, rows, chunk):
            part = slice(start, min(start + chunk, rows))
            logits = upcast(torch.addmm(bias, hidden[part], weight_t) if bias is not None else hidden[part] @ weight_t)
            shifted = logits.sub_(logits.amax(dim=-1, keepdim=True))
            if u is None:
                target = targets[part]
                picked = shifted.gather(1, target[:, None]).squeeze(1)
            e = shifted.exp_()  # one exp per logit; softmax = e / total
            total = e.sum(dim=-1)
            if u is not None:
                cdf = e.cumsum(dim=-1)
                target = torch.searchsorted(cdf, u[part, None] * cdf[:, -1:], right=True).squeeze(-1)
                target = target.clamp_max_(vocab - 1)
                picked = e.gather(1, target[:, None]).squeeze(1).log()
            losses[part] = total.log() - picked
            # d loss / d hidden = (softmax - one-hot) W = (e W) / total - W[target]
            grad[part] = (e.to(weight.dtype) @ weight) / total[:, None].to(weight.dtype) - weight[target]
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        return grad * grad_losses[:, None].to(grad.dtype), None, None, None, None


def _fused_head(model: nn.Module):
    """The model's LM head when its loss can be fused here, else None."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (not _OUTPUTS_ONLY.get() or getattr(config, "model_type", None) not in FUSED_HEAD_TYPES
            or type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks
            or getattr(config, "final_logit_softcapping", None)):
        return None  # e.g. a tracked head (its hooks must run) or a model that rescales its logits
    return head


class Task(ABC):
    """The loss a model is scored with. Subclasses define the batch format."""

    @abstractmethod
    def sequence_losses(self, model: nn.Module, batch: Any, *, sample: bool = False,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sequence summed loss, shape (B,)."""

    @abstractmethod
    def activation_mask(self, batch: Any) -> torch.Tensor | None:
        """(B, T) positions whose activations and output gradients count (None: all)."""

    @abstractmethod
    def batch_size(self, batch: Any) -> int:
        """Number of sequences in the batch."""


class LanguageModelingTask(Task):
    """Causal LM loss. Batch: dict with ``input_ids``, ``attention_mask`` and ``labels``.

    ``labels`` is aligned with ``input_ids`` (shifted inside) and holds -100 where a token is not
    scored: padding for pretraining text, prompt tokens for instruction data.
    """

    def _logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits

    def token_losses(self, model: nn.Module, batch: dict, *, sample: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Loss of each predicted token, (B, T-1), zero where not scored."""
        head = _fused_head(model)
        if head is not None:
            return self._fused_token_losses(model, head, batch, sample, generator)
        logits = self._logits(model, batch)[:, :-1]
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        if sample:
            with torch.no_grad():
                targets = _sampled_targets(logits, keep, generator)
        nll = F.cross_entropy(upcast(logits.reshape(-1, logits.shape[-1])), targets.reshape(-1),
                              ignore_index=IGNORE, reduction="none")
        return nll.view(targets.shape)

    def _fused_token_losses(self, model, head, batch, sample, generator) -> torch.Tensor:
        """token_losses with the head and the loss fused (``_FusedHeadLoss``): logits only for
        scored positions, never all at once. The same draws as the plain path when sampling."""
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))[0]
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        u = None
        if sample:  # one uniform per position, drawn as _sampled_targets draws them
            u = torch.rand(keep.shape + (1,), generator=generator, device=hidden.device,
                           dtype=upcast(hidden[:0]).dtype)[keep].squeeze(-1)
        rows = hidden[:, :-1][keep]
        bias = head.bias
        losses = _FusedHeadLoss.apply(rows, head.weight.detach(), None if bias is None else bias.detach(),
                                      targets[keep], u)
        out = losses.new_zeros(targets.shape)
        out[keep] = losses
        return out

    def sequence_losses(self, model, batch, *, sample=False, generator=None):
        return self.token_losses(model, batch, sample=sample, generator=generator).sum(dim=1)

    def activation_mask(self, batch):
        return batch.get("attention_mask")

    def batch_size(self, batch):
        return batch["input_ids"].shape[0]

    @staticmethod
    def split_targets(batch: dict) -> tuple[dict, torch.Tensor]:
        """One row per scored target token, keeping only that target's label.

        Influence is linear in the query gradient, so scores of these rows sum to the score of the
        whole answer: this gives the answer-side token heatmap. Returns the new batch and, per row,
        (source row, token position) of the scored token.
        """
        labels = batch["labels"]
        positions = (labels[:, 1:] != IGNORE).nonzero()  # (K, 2): row, target index - 1
        positions[:, 1] += 1
        rows = positions[:, 0]
        new_labels = torch.full_like(labels[rows], IGNORE)
        k = torch.arange(len(rows), device=labels.device)
        new_labels[k, positions[:, 1]] = labels[positions[:, 0], positions[:, 1]]
        split = {key: value[rows] for key, value in batch.items() if torch.is_tensor(value)}
        split["labels"] = new_labels
        return split, positions


class ClassificationTask(Task):
    """Softmax cross-entropy on ``(inputs, targets)`` batches, one prediction per example."""

    def sequence_losses(self, model, batch, *, sample=False, generator=None):
        inputs, targets = batch
        logits = model(inputs)
        if sample:
            with torch.no_grad():
                keep = torch.ones_like(targets, dtype=torch.bool)
                targets = _sampled_targets(logits, keep, generator)
        return F.cross_entropy(upcast(logits), targets, reduction="none")

    def activation_mask(self, batch):
        return None

    def batch_size(self, batch):
        return batch[0].shape[0]

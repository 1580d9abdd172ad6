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
        logits = self._logits(model, batch)[:, :-1]
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        if sample:
            with torch.no_grad():
                targets = _sampled_targets(logits, keep, generator)
        nll = F.cross_entropy(upcast(logits.reshape(-1, logits.shape[-1])), targets.reshape(-1),
                              ignore_index=IGNORE, reduction="none")
        return nll.view(targets.shape)

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

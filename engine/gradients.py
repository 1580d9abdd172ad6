"""Per-sequence gradients of tracked layers, streamed batch by batch.

``capture`` runs one forward and one backward (to layer outputs only) and yields, per tracked
layer, the activations ``a`` (B, T, in[+1]) and output gradients ``g`` (B, T, out). Everything
else (covariances, eigenvalue corrections, scores, token heatmaps) is a function of those pairs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .tasks import Task, outputs_only
from .tracking import LayerCapture, TrackedLayer, tracking_mode


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def capture(model: nn.Module, task: Task, batch: Any, layers: Sequence[TrackedLayer], *,
            sample: bool = False, generator: torch.Generator | None = None,
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor | None]:
    """Activations and output gradients of every tracked layer for one batch.

    Returns ``(a, g, mask)`` with ``a[name]`` (B, T, in[+1]) and ``g[name]`` (B, T, out), upcast
    to float32 (float64 kept), both zero at masked positions, and the (B, T) mask (None: all count).
    """
    batch = to_device(batch, model_device(model))
    mask = task.activation_mask(batch)
    applied = None if mask is None or bool(mask.all()) else mask  # nothing to zero: no multiply
    with tracking_mode(model, layers), LayerCapture(layers) as cap:
        with outputs_only():  # only tracked layers' outputs are differentiated: the loss may be fused
            loss = task.sequence_losses(model, batch, sample=sample, generator=generator).sum()
        grads = cap.output_gradients(loss, applied)
        acts = {layer.name: cap.activations(layer, applied) for layer in layers}
    return acts, grads, mask


def per_sequence(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """G_b = sum_t g_bt a_bt^T, (B, out, in[+1]), as one batched matmul (no copy of either side)."""
    return torch.bmm(g.transpose(1, 2), a)


def sequence_gradients(model: nn.Module, task: Task, batch: Any, layers: Sequence[TrackedLayer],
                       *, sample: bool = False, generator: torch.Generator | None = None,
                       ) -> dict[str, torch.Tensor]:
    """Per-sequence gradient of every tracked layer: G_b = sum_t g_bt a_bt^T, (B, out, in[+1])."""
    acts, grads, _ = capture(model, task, batch, layers, sample=sample, generator=generator)
    return {name: per_sequence(grads[name], acts[name]) for name in acts}


def stack_gradients(model: nn.Module, task: Task, batches: Iterable[Any],
                    layers: Sequence[TrackedLayer]) -> dict[str, torch.Tensor]:
    """Per-sequence gradients of many batches, concatenated along the first axis."""
    parts: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    for batch in batches:
        for name, grad in sequence_gradients(model, task, batch, layers).items():
            parts[name].append(grad)
    return {name: torch.cat(p) for name, p in parts.items()}


def flatten(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate per-layer gradients (N, out, in) into one (N, P) matrix, in dict order."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)

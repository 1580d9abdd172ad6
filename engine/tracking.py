"""Tracked layers: which linear maps carry influence, and how their (a, g) pairs are captured.

A tracked layer computes ``s = W a (+ b)`` at every token. Its per-sequence weight gradient is
``G = sum_t g_t a_t^T`` with ``g_t = dL/ds_t``; a bias is folded in as an extra input fixed to 1,
so ``G`` has shape ``(out, in + 1)`` and its last column is the bias gradient. Every estimator in
this package works on ``G`` in that layout, whatever the module's own weight layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

try:  # GPT-2 style models store linear weights transposed, as (in, out).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()

# A module counts as "inside the transformer blocks" when its name holds a ModuleList index,
# e.g. gpt_neox.layers.3.mlp.dense_h_to_4h, model.layers.0.self_attn.q_proj, transformer.h.1.attn.c_attn.
DEFAULT_INCLUDE = (r"\.\d+\.",)
DEFAULT_EXCLUDE = (r"(^|\.)(lm_head|embed_out|embed_in|embed_tokens|wte|wpe)$",)


@dataclass(frozen=True)
class TrackedLayer:
    """A linear map whose gradient enters the influence computation."""

    name: str
    module: nn.Module
    in_features: int
    out_features: int
    has_bias: bool
    transposed: bool  # True for transformers' Conv1D, whose weight is (in, out)

    @property
    def gradient_shape(self) -> tuple[int, int]:
        """Shape of G: (out, in [+1 for the bias])."""
        return self.out_features, self.in_features + int(self.has_bias)

    def parameter_gradients(self, grad: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map G (..., out, in[+1]) back to the module's own parameter layout."""
        weight = grad[..., : self.in_features]
        out = {"weight": weight.transpose(-1, -2) if self.transposed else weight}
        if self.has_bias:
            out["bias"] = grad[..., self.in_features]
        return out


def _describe(name: str, module: nn.Module) -> TrackedLayer | None:
    if isinstance(module, nn.Linear):
        return TrackedLayer(name, module, module.in_features, module.out_features,
                            module.bias is not None, transposed=False)
    if Conv1D and isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return TrackedLayer(name, module, d_in, d_out, module.bias is not None, transposed=True)
    return None


def find_tracked_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[TrackedLayer]:
    """Linear layers of ``model`` selected by regular expressions on their qualified names.

    A layer is tracked when some ``include`` pattern matches (``re.search``) and no ``exclude``
    pattern does. Defaults: every Linear/Conv1D inside the transformer blocks; embeddings and
    the LM head excluded (the exclusions apply only when ``include`` is not given).
    """
    if exclude is None:  # naming layers explicitly (e.g. the LM head) lifts the default exclusions
        exclude = DEFAULT_EXCLUDE if include is None else ()
    include = DEFAULT_INCLUDE if include is None else tuple(include)
    layers = []
    for name, module in model.named_modules():
        layer = _describe(name, module)
        if layer is None:
            continue
        if any(re.search(p, name) for p in include) and not any(re.search(p, name) for p in exclude):
            layers.append(layer)
    if not layers:
        raise ValueError(
            f"no linear layer of {type(model).__name__} matches include={list(include)} "
            f"exclude={list(exclude)}; pass include/exclude patterns naming the layers to track"
        )
    _reject_shared_weights(model, layers)
    return layers


def _reject_shared_weights(model: nn.Module, layers: Sequence[TrackedLayer]) -> None:
    """A weight used by two modules (a tied LM head) has a gradient no single layer's (a, g) gives."""
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            users.setdefault(id(param), []).append(name)
    for layer in layers:
        shared = users[id(layer.module.weight)]
        if len(shared) > 1:
            raise ValueError(f"{layer.name} shares its weight with {[n for n in shared if n != layer.name]} "
                             "(tied embeddings); its per-layer gradient would be partial, so it "
                             "cannot be tracked")


def upcast(t: torch.Tensor) -> torch.Tensor:
    """float32 for half/bfloat16/float32 tensors; float64 stays float64 (exact tests use it)."""
    return t if t.dtype == torch.float64 else t.float()


class LayerCapture:
    """Records each tracked layer's input activations ``a`` and output ``s`` during a forward.

    After the forward, :meth:`output_gradients` returns ``g = dL/ds`` for every layer with one
    ``torch.autograd.grad`` call, which skips the (unneeded) parameter-gradient kernels.
    """

    def __init__(self, layers: Sequence[TrackedLayer]):
        self.layers = list(layers)
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _hook(self, layer: TrackedLayer):
        def hook(module, args, output):
            if layer.name in self.outputs:
                raise RuntimeError(f"tracked layer {layer.name} ran twice in one forward; "
                                   "shared weights are not supported")
            self.inputs[layer.name] = args[0].detach()
            self.outputs[layer.name] = output
        return hook

    def __enter__(self) -> LayerCapture:
        self._handles = [layer.module.register_forward_hook(self._hook(layer)) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()

    def activations(self, layer: TrackedLayer, mask: torch.Tensor | None) -> torch.Tensor:
        """Inputs (B, T, in[+1]), upcast to float32 (float64 kept), bias column of ones, mask applied.

        One new tensor at most: the bias column and the mask are written in the same pass as the
        copy (``mask=None`` when every position counts)."""
        a = self.inputs[layer.name]
        if a.dim() == 2:  # a non-sequence model: one "token" per example
            a = a.unsqueeze(1)
        dtype = upcast(a[:0]).dtype
        if not layer.has_bias:
            return upcast(a) if mask is None else torch.mul(a, mask.unsqueeze(-1).to(dtype))
        out = a.new_empty(a.shape[:-1] + (a.shape[-1] + 1,), dtype=dtype)
        if mask is None:
            out[..., :-1].copy_(a)
            out[..., -1] = 1
        else:
            weights = mask.to(dtype)
            torch.mul(a, weights.unsqueeze(-1), out=out[..., :-1])
            out[..., -1] = weights
        return out

    def output_gradients(self, loss: torch.Tensor, mask: torch.Tensor | None,
                         retain_graph: bool = False) -> dict[str, torch.Tensor]:
        """g = dL/ds per layer, (B, T, out), upcast like the activations, masked positions 0."""
        missing = [layer.name for layer in self.layers if layer.name not in self.outputs]
        if missing:
            raise RuntimeError(f"tracked layers did not run in the forward pass: {missing}")
        outs = [self.outputs[layer.name] for layer in self.layers]
        grads = torch.autograd.grad(loss, outs, retain_graph=retain_graph, allow_unused=True)
        result, masked = {}, set()
        for layer, out, g in zip(self.layers, outs, grads):
            g = torch.zeros_like(out) if g is None else upcast(g)
            if g.dim() == 2:
                g = g.unsqueeze(1)
            if mask is not None and id(g) not in masked:  # autograd's own buffer, masked in place once
                g.mul_(mask.unsqueeze(-1).to(g.dtype))  # (one buffer can serve two outputs: a residual sum)
                masked.add(id(g))
            result[layer.name] = g
        return result


@contextmanager
def tracking_mode(model: nn.Module, layers: Sequence[TrackedLayer]) -> Iterator[None]:
    """Eval mode (no dropout) with gradients enabled on tracked weights, restored afterwards."""
    was_training = model.training
    saved = [(p, p.requires_grad) for layer in layers for p in layer.module.parameters(recurse=False)]
    model.eval()
    try:
        for p, _ in saved:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)

"""Fitting curvature factors (EK-FAC and alternatives) and storing them as safetensors."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .curvature import LayerFactors, get_strategy
from .gradients import capture, iterate_batches, model_device
from .storage import save_tensors
from .tasks import Task
from .tracking import TrackedLayer

FORMAT = "msif-factors"


class FactorMismatchError(ValueError):
    """Factors were fitted on a different model (or different tracked layers)."""


@dataclass
class FactorArguments:
    """Every knob of a factor fit; saved beside the factors."""

    strategy: str = "ekfac"  # ekfac | kfac | diagonal | identity
    fisher: str = "true"  # true: labels sampled from the model; empirical: the data's labels
    seed: int = 0  # label sampling
    label_samples: int = 1  # label draws per sequence (true Fisher); more draws, less noise
    max_batches: int | None = None  # per pass; None = the whole loader
    progress: bool = True
    # {layer-name regex: n}: S of matching layers is block-diagonal over n equal output blocks,
    # e.g. {"attention.query_key_value": num_heads} for per-head factors of a fused QKV layer
    # (GPT-NeoX lays its output out head by head). Cross-block output correlations are dropped.
    split_outputs: dict[str, int] = field(default_factory=dict)


def model_fingerprint(model: nn.Module, layers: Sequence[TrackedLayer]) -> dict[str, Any]:
    """Identity of a model as seen by its tracked layers: names, shapes and a weight hash.

    The hash covers every tracked bias and 4096 pseudo-randomly placed values of every tracked
    weight (all of a small one), rounded to bfloat16: the same checkpoint loaded in float32 or
    bfloat16 on any device matches, a fine-tuned child does not, and hashing stays cheap for
    billions of parameters.
    """
    digest = hashlib.sha256()
    shapes = {}
    for layer in layers:
        shapes[layer.name] = list(layer.gradient_shape)
        digest.update(layer.name.encode())
        for param in layer.module.parameters(recurse=False):
            flat = param.detach().reshape(-1)
            if flat.numel() > 4096:
                picks = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(flat.numel()))
                flat = flat[picks[:4096].to(flat.device)]
            digest.update(flat.to(torch.bfloat16).float().cpu().numpy().tobytes())
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "name_or_path": getattr(config, "_name_or_path", "") or "",
        "layers": shapes,
        "weights_sha256": digest.hexdigest(),
    }


@dataclass
class Factors:
    """Curvature statistics of one model: one :class:`LayerFactors` per tracked layer."""

    strategy: str
    layers: dict[str, LayerFactors]
    num_sequences: int
    num_tokens: int
    model: dict[str, Any]
    arguments: dict[str, Any] = field(default_factory=dict)

    def check_compatible(self, model: nn.Module, layers: Sequence[TrackedLayer]) -> None:
        """Raise :class:`FactorMismatchError` unless these factors were fitted on ``model``."""
        found = model_fingerprint(model, layers)
        if found["layers"] != self.model["layers"]:
            fitted, given = set(self.model["layers"]), set(found["layers"])
            raise FactorMismatchError(
                f"tracked layers differ from the fitted ones: missing {sorted(fitted - given)[:5]}, "
                f"unexpected {sorted(given - fitted)[:5]}, or shapes changed")
        if found["weights_sha256"] != self.model["weights_sha256"]:
            raise FactorMismatchError(
                f"model weights do not match the factors (fitted on "
                f"{self.model.get('name_or_path') or self.model['class']!r}, "
                f"given {found.get('name_or_path') or found['class']!r})")

    def spectrum(self, name: str, points: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """The layer's approximate-Fisher eigenvalues, largest first: (ranks, values), 1-based ranks.

        Large layers have millions of eigenvalues; ``points`` log-spaced ranks (always including
        the first and last) keep a plot's shape without shipping them all.
        """
        lam = get_strategy(self.strategy).eigenvalues(self.layers[name])
        if lam is None:
            return np.ones(1), np.ones(1)  # H = I
        values = torch.sort(lam.double().flatten(), descending=True).values.cpu().numpy()
        n = len(values)
        ranks = (np.arange(1, n + 1) if n <= points else
                 np.unique(np.geomspace(1, n, num=points).round().astype(np.int64)))
        return ranks.astype(np.float64), values[ranks - 1]

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (a temporary file in the same folder, then a rename)."""
        tensors = {f"{name}/{key}": t.detach().cpu().contiguous()
                   for name, lf in self.layers.items() for key, t in lf.tensors().items()}
        metadata = {
            "format": FORMAT,
            "engine_version": __version__,
            "strategy": self.strategy,
            "layers": json.dumps(list(self.layers)),
            "model": json.dumps(self.model),
            "counts": json.dumps({"sequences": self.num_sequences, "tokens": self.num_tokens}),
            "arguments": json.dumps(self.arguments),
            "dtype": "float64",
        }
        save_tensors(tensors, path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Factors:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an msif factor file (format={meta.get('format')!r})")
        tensors = load_file(str(path), device=str(device))
        layers = {name: LayerFactors() for name in json.loads(meta["layers"])}
        for key, value in tensors.items():
            name, _, attr = key.rpartition("/")
            setattr(layers[name], attr, value)
        counts = json.loads(meta["counts"])
        return cls(meta["strategy"], layers, counts["sequences"], counts["tokens"],
                   json.loads(meta["model"]), json.loads(meta["arguments"]))


class _Accumulator:
    """Float64 running sums per layer."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.double()
        if name in self.sums:
            self.sums[name] += value
        else:
            self.sums[name] = value


def _passes(model, task, loader, layers, args: FactorArguments, label: str, seed: int):
    """Yield (a, g, mask, batch_size) per batch and label draw, labels as the Fisher type asks.

    Statistics are averaged over draws: each draw counts as one sequence in the sums.
    """
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    sample = args.fisher == "true"
    draws = args.label_samples if sample else 1
    bar = tqdm(iterate_batches(loader, args.max_batches), desc=label, disable=not args.progress,
               unit="batch", leave=False)
    for batch in bar:
        for _ in range(draws):
            acts, grads, mask = capture(model, task, batch, layers, sample=sample, generator=generator)
            yield acts, grads, mask, task.batch_size(batch)


def fit_factors(model: nn.Module, task: Task, loader: Iterable[Any],
                layers: Sequence[TrackedLayer], args: FactorArguments | None = None) -> Factors:
    """Fit the statistics ``args.strategy`` needs, streaming ``loader`` once per pass.

    covariance pass: A = sum a a^T / tokens, S = sum g g^T / sequences, eigendecomposed in float64;
    correction pass: Lambda = sum_b (Q_S^T G_b Q_A)^2 / sequences;  diagonal pass: sum_b G_b^2 / sequences.
    """
    args = args or FactorArguments()
    if args.fisher not in ("true", "empirical"):
        raise ValueError(f"fisher must be 'true' or 'empirical', got {args.fisher!r}")
    if args.label_samples < 1:
        raise ValueError(f"label_samples must be >= 1, got {args.label_samples}")
    strategy = get_strategy(args.strategy)
    factors = {layer.name: LayerFactors() for layer in layers}
    tokens = sequences = 0

    if "covariance" in strategy.passes:
        act_cov, grad_cov = _Accumulator(), _Accumulator()
        tokens = sequences = 0
        for acts, grads, mask, n in _passes(model, task, loader, layers, args, "covariance", args.seed):
            for name in acts:
                a = acts[name].flatten(0, 1)
                g = grads[name].flatten(0, 1)
                act_cov.add(name, a.T @ a)
                grad_cov.add(name, g.T @ g)
            tokens += _count_tokens(mask, acts, n)
            sequences += n
        _check_nonempty(sequences)
        for name, lf in factors.items():
            lf.activation_covariance = act_cov.sums[name] / tokens
            lf.gradient_covariance = _split_outputs(grad_cov.sums[name] / sequences, name,
                                                    args.split_outputs)
            lf.activation_eigenvalues, lf.activation_eigenvectors = torch.linalg.eigh(
                lf.activation_covariance)
            lf.gradient_eigenvalues, lf.gradient_eigenvectors = torch.linalg.eigh(
                lf.gradient_covariance)

    second = [p for p in ("correction", "diagonal") if p in strategy.passes]
    if second:
        acc = _Accumulator()
        seqs = 0
        basis = {name: (lf.gradient_eigenvectors, lf.activation_eigenvectors)
                 for name, lf in factors.items() if lf.gradient_eigenvectors is not None}
        tokens = 0
        for acts, grads, mask, n in _passes(model, task, loader, layers, args, second[0], args.seed + 1):
            tokens += _count_tokens(mask, acts, n)
            for name in acts:
                a, g = acts[name], grads[name]
                if "correction" in second:  # Q_S^T G Q_A = sum_t (Q_S^T g_t)(Q_A^T a_t)^T
                    q_s, q_a = basis[name]
                    a, g = a @ q_a.to(a), g @ q_s.to(g)
                per_sequence = torch.einsum("bto,bti->boi", g, a)
                acc.add(name, per_sequence.square().sum(0))
            seqs += n
        _check_nonempty(seqs)
        sequences = sequences or seqs
        for name, lf in factors.items():
            if "correction" in second:
                lf.corrected_eigenvalues = acc.sums[name] / seqs
            else:
                lf.diagonal = acc.sums[name] / seqs

    draws = args.label_samples if args.fisher == "true" else 1
    return Factors(strategy.name, factors, sequences // draws, tokens // draws,
                   model_fingerprint(model, layers),
                   asdict(args))


def output_blocks(name: str, out_features: int, split: dict[str, int]) -> int:
    """How many equal output blocks ``split`` gives the layer ``name`` (1 = no split)."""
    blocks = [n for pattern, n in split.items() if re.search(pattern, name)]
    if len(blocks) > 1:
        raise ValueError(f"{name} matches several split_outputs patterns: {sorted(split)}")
    n = blocks[0] if blocks else 1
    if n < 1 or out_features % n:
        raise ValueError(f"{name}: {out_features} outputs cannot be split into {n} equal blocks")
    return n


def _split_outputs(s: torch.Tensor, name: str, split: dict[str, int]) -> torch.Tensor:
    """S with the correlations between output blocks set to zero (block-diagonal)."""
    n = output_blocks(name, s.shape[0], split)
    if n == 1:
        return s
    size = s.shape[0] // n
    block = torch.arange(s.shape[0], device=s.device) // size
    return s * (block[:, None] == block[None, :]).to(s)


def _count_tokens(mask: torch.Tensor | None, acts: dict[str, torch.Tensor], n: int) -> int:
    return int(mask.sum()) if mask is not None else n * next(iter(acts.values())).shape[1]


def _check_nonempty(sequences: int) -> None:
    if sequences == 0:
        raise ValueError("the fitting data loader yielded no batch; factors need data")

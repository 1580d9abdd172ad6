"""Fitting curvature factors (EK-FAC and alternatives) and storing them, one file per layer.

Memory is bounded by design: running sums live in ``FactorArguments.accumulation`` precision
(float32 unless asked; float64 models always use float64), each layer is eigendecomposed alone in
float64, only what scores need is kept (eigenvectors and eigenvalues in the model's compute
precision; covariances only when asked), and a factor directory is written and read layer by
layer. Under torchrun the ranks take disjoint batches, labels are sampled from a seed per
(pass, batch, draw), sums are all-reduced and eigendecompositions are shared out by layer, so
the factors do not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from . import distributed as dist
from .curvature import LayerFactors, get_strategy
from .gradients import capture, model_device, per_sequence
from .storage import atomic_dir, save_tensors, write_json
from .tasks import Task
from .tracking import TrackedLayer

FORMAT = "msif-factors"
FORMAT_VERSION = 2  # a directory: index.json and one safetensors file per layer
INDEX = "index.json"
PASSES = {"covariance": 0, "correction": 1, "diagonal": 1}  # label streams per pass


class FactorMismatchError(ValueError):
    """Factors were fitted on a different model (or different tracked layers)."""


@dataclass
class FactorArguments:
    """Every knob of a factor fit; saved beside the factors."""

    strategy: str = "ekfac"  # ekfac | kfac | diagonal | identity
    fisher: str = "true"  # true: labels sampled from the model; empirical: the data's labels
    seed: int = 0  # label sampling: one stream per (seed, pass, batch, draw)
    label_samples: int = 1  # label draws per sequence (true Fisher); more draws, less noise
    max_batches: int | None = None  # per pass; None = the whole loader
    progress: bool = True  # not saved: it does not change the factors
    # {layer-name regex: n}: S of matching layers is block-diagonal over n equal output blocks,
    # e.g. {"attention.query_key_value": num_heads} for per-head factors of a fused QKV layer
    # (GPT-NeoX lays its output out head by head). Cross-block output correlations are dropped.
    split_outputs: dict[str, int] = field(default_factory=dict)
    accumulation: str = "float32"  # running sums: float32 | float64 (float64 models: always float64)
    covariances: bool = False  # keep A and S themselves (memory and files), not only their eigenbases
    dtype: str | None = None  # stored factors; None: the model's compute precision (float32, or float64)

    def __post_init__(self):
        if self.fisher not in ("true", "empirical"):
            raise ValueError(f"fisher must be 'true' or 'empirical', got {self.fisher!r}")
        if self.label_samples < 1:
            raise ValueError(f"label_samples must be >= 1, got {self.label_samples}")
        if self.accumulation not in ("float32", "float64"):
            raise ValueError(f"accumulation must be 'float32' or 'float64', got {self.accumulation!r}")
        if self.dtype not in (None, "float32", "float64"):
            raise ValueError(f"dtype must be None, 'float32' or 'float64', got {self.dtype!r}")

    def saved(self) -> dict[str, Any]:
        """What goes into the factor files (everything that changes the numbers)."""
        return {k: v for k, v in asdict(self).items() if k != "progress"}


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


def _held(stored: torch.Tensor, dtype: torch.dtype, layer: str) -> torch.Tensor:
    """A stored factor in a serving precision; float16's range (65504) is checked, not assumed:
    an eigenvalue past it would become inf and silently zero that direction's influence."""
    held = stored.to(dtype)
    if not torch.isfinite(held).all() and torch.isfinite(stored).all():
        raise ValueError(f"layer {layer}: its factors exceed {str(dtype).removeprefix('torch.')}'s range "
                         f"(largest {stored.abs().max().item():.3g}); hold them in bfloat16 or float32")
    return held


class StoredLayers(Mapping):
    """A factor directory's layers, each read from its own file on first use and then kept."""

    def __init__(self, directory: Path, files: dict[str, str], device: str | torch.device = "cpu",
                 cache: bool = True, dtype: torch.dtype | None = None):
        self.directory, self.files, self.device, self.cache = Path(directory), dict(files), str(device), cache
        self.dtype = dtype
        self._loaded: dict[str, LayerFactors] = {}

    def __getitem__(self, name: str) -> LayerFactors:
        if name in self._loaded:
            return self._loaded[name]
        layer = self._held(self._read(name), name)
        if self.cache:
            self._loaded[name] = layer
        return layer

    def stored(self, name: str) -> LayerFactors:
        """The layer at its stored precision, not kept; where layers are held in another precision
        and kept, the held copy is made from this same read (one read of the file for both)."""
        tensors = self._read(name)
        if self.dtype is not None and self.cache and name not in self._loaded:
            self._loaded[name] = self._held(tensors, name)
        return LayerFactors(**tensors)

    def _read(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if name not in self.files:
            raise KeyError(name)
        return load_file(str(self.directory / self.files[name]), device=self.device)

    def _held(self, tensors: dict[str, torch.Tensor], name: str) -> LayerFactors:
        """Stored precision -> serving precision, a layer at a time."""
        if self.dtype is not None:
            tensors = {k: _held(v, self.dtype, name) if v.is_floating_point() else v for k, v in tensors.items()}
        return LayerFactors(**tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


class _AsStored(Mapping):
    """A StoredLayers' layers at their stored precision (``StoredLayers.stored``)."""

    def __init__(self, layers: StoredLayers):
        self.layers = layers

    def __getitem__(self, name: str) -> LayerFactors:
        return self.layers.stored(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


@dataclass
class Factors:
    """Curvature statistics of one model: one :class:`LayerFactors` per tracked layer."""

    strategy: str
    layers: Mapping[str, LayerFactors]
    num_sequences: int
    num_tokens: int
    model: dict[str, Any]
    arguments: dict[str, Any] = field(default_factory=dict)

    def as_stored(self) -> Factors:
        """These factors at their stored precision (float32), for what must not see 16-bit rounding
        (which eigen-coordinates the whitening keeps); where they are held in 16 bits, each layer is
        read once for both."""
        if not isinstance(self.layers, StoredLayers) or self.layers.dtype is None:
            return self
        return replace(self, layers=_AsStored(self.layers))

    def truncated(self, keep: float) -> Factors:
        """Each layer's eigenbasis cut to the eigenvectors of its factors' largest ``keep`` share of
        eigenvalues (``Curvature.truncate``: damping alone on the rest), held in memory."""
        strategy = get_strategy(self.strategy)
        return replace(self, layers={name: strategy.truncate(self.layers[name], keep) for name in self.layers},
                       arguments={**self.arguments, "truncated_to": keep})

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

    def save(self, directory: str | os.PathLike, release: bool = False) -> None:
        """Write a factor directory atomically: one safetensors file per layer, then index.json.

        Layers are written one at a time, so writing holds one layer's bytes beside the factors;
        ``release=True`` also drops each layer from memory once written (a fit's last step).
        """
        files = {name: f"layer-{i:04d}.safetensors" for i, name in enumerate(self.layers)}
        dtypes = set()
        with atomic_dir(directory) as tmp:
            for name in list(self.layers):
                tensors = self.layers[name].tensors()
                dtypes |= {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
                save_tensors(tensors, tmp / files[name], {"format": f"{FORMAT}-layer", "layer": name})
                if release and isinstance(self.layers, dict):
                    self.layers[name] = LayerFactors()  # the index still lists it; its memory is free
            write_json(tmp / INDEX, {
                "format": FORMAT, "format_version": FORMAT_VERSION, "engine_version": __version__,
                "strategy": self.strategy, "dtype": sorted(dtypes), "layers": files, "model": self.model,
                "counts": {"sequences": self.num_sequences, "tokens": self.num_tokens},
                "arguments": self.arguments})

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu", cache: bool = True,
             dtype: torch.dtype | None = None) -> Factors:
        """Open a factor directory; each layer is read (onto ``device``) when first used, and kept
        unless ``cache=False`` (then a layer is read again at every use and memory stays flat).
        ``dtype`` (e.g. bfloat16) holds the layers in another precision than stored: half the device
        memory; preconditioning computes in the query's precision (the factors are upcast per layer)."""
        directory = Path(directory)
        if directory.is_file():
            raise ValueError(f"{directory} is a single factor file from an older msif; factors are now "
                             "a directory per model (refit them, or rebuild the study)")
        index = directory / INDEX
        if not index.is_file():
            raise ValueError(f"{directory} is not an msif factor directory (no {INDEX})")
        meta = json.loads(index.read_text())
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: factor format {meta.get('format')!r} version "
                             f"{meta.get('format_version')}, this msif reads {FORMAT} {FORMAT_VERSION}")
        counts = meta["counts"]
        return cls(meta["strategy"], StoredLayers(directory, meta["layers"], device, cache, dtype), counts["sequences"],
                   counts["tokens"], meta["model"], meta["arguments"])


def label_seed(seed: int, pass_name: str, batch: int, draw: int) -> int:
    """The label-sampling seed of one (pass, batch, draw): independent of which rank runs it."""
    text = f"{seed}/{PASSES[pass_name]}/{batch}/{draw}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


@dataclass
class _Counts:
    sequences: int = 0
    tokens: int = 0

    def add(self, mask: torch.Tensor | None, acts: dict[str, torch.Tensor], n: int) -> None:
        self.sequences += n
        self.tokens += int(mask.sum()) if mask is not None else n * next(iter(acts.values())).shape[1]

    def all_reduce(self) -> _Counts:
        total = dist.all_reduce_sum(torch.tensor([self.sequences, self.tokens], dtype=torch.float64))
        self.sequences, self.tokens = (int(x) for x in total.tolist())
        if self.sequences == 0:
            raise ValueError("the fitting data loader yielded no batch; factors need data")
        return self


class _Sums:
    """Running sums per layer, zero-initialised so that every rank all-reduces the same tensors
    (a rank may get no batch), in the accumulation precision."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device):
        self.values = {name: torch.zeros(shape, dtype=dtype, device=device) for name, shape in shapes.items()}

    def add(self, name: str, value: torch.Tensor) -> None:
        self.values[name] += value

    def add_squares(self, name: str, parts) -> None:
        """Add the elementwise square of each tensor of ``parts``."""
        total = self.values[name]
        for part in parts:
            if total.dtype == part.dtype:
                total.addcmul_(part, part)
            else:
                total.add_(part.square())

    def add_gram(self, name: str, x: torch.Tensor) -> None:
        """Add x^T x: in place into the sum when the precisions agree (no product tensor)."""
        total = self.values[name]
        if total.dtype == x.dtype:
            total.addmm_(x.T, x)
        else:
            total += x.T @ x

    def all_reduce(self) -> _Sums:
        for value in self.values.values():
            dist.all_reduce_sum(value)
        return self


class _Rows:
    """A padded batch's real token rows: statistics over tokens skip the padding's zero rows (a
    quarter of the work for documents of mixed lengths)."""

    def __init__(self, mask: torch.Tensor | None, batch: int, length: int):
        self.padded = mask is not None and not bool(mask.all())
        self.shape = (batch, length)
        if self.padded:
            self.index = mask.reshape(-1).nonzero().squeeze(1)
            self.lengths = mask.sum(1).tolist()

    def real(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (real tokens, d), in order: each sequence's tokens stay together."""
        flat = x.flatten(0, 1)
        return flat.index_select(0, self.index) if self.padded else flat

    def per_sequence(self, g: torch.Tensor, a: torch.Tensor):
        """sum_t g_t a_t^T of each sequence, from real-token rows (``real``): one batched product
        when nothing is padded, else one product per sequence over its own rows."""
        if not self.padded:
            yield from per_sequence(g.view(*self.shape, -1), a.view(*self.shape, -1))
            return
        start = 0
        for length in self.lengths:
            yield g[start:start + length].T @ a[start:start + length]
            start += length


def _accumulation_dtype(model: nn.Module, args: FactorArguments) -> torch.dtype:
    if args.accumulation == "float64" or next(model.parameters()).dtype == torch.float64:
        return torch.float64
    return torch.float32


def _each_capture(model, task, loader, layers, args: FactorArguments, pass_name: str, visit) -> None:
    """``visit(a, g, mask, batch_size)`` for this rank's batches and label draws. A batch's
    captures are dropped before the next batch is captured, so that one batch's (a, g) is in
    memory at a time (a loop over a generator would hold two)."""
    device = model_device(model)
    sample = args.fisher == "true"
    draws = args.label_samples if sample else 1
    batches = dist.my_batches(loader, args.max_batches)
    for index, batch in tqdm(batches, desc=pass_name, disable=not args.progress, unit="batch", leave=False):
        for draw in range(draws):
            generator = (torch.Generator(device=device).manual_seed(label_seed(args.seed, pass_name, index, draw))
                         if sample else None)
            acts, grads, mask = capture(model, task, batch, layers, sample=sample, generator=generator)
            visit(acts, grads, mask, task.batch_size(batch))
            del acts, grads, mask


def fit_factors(model: nn.Module, task: Task, loader: Iterable[Any], layers: Sequence[TrackedLayer],
                args: FactorArguments | None = None, out: str | os.PathLike | None = None) -> Factors:
    """Fit the statistics ``args.strategy`` needs, streaming ``loader`` once per pass.

    covariance pass: A = sum a a^T / tokens, S = sum g g^T / sequences, eigendecomposed in float64;
    correction pass: Lambda = sum_b (Q_S^T G_b Q_A)^2 / sequences;  diagonal pass: sum_b G_b^2 / sequences.
    With ``out`` the factors are written there layer by layer (leaving memory as they go) and
    returned as a directory read lazily.
    """
    args = args or FactorArguments()
    strategy = get_strategy(args.strategy)
    fitted = {layer.name: LayerFactors() for layer in layers}
    counts = None
    if "covariance" in strategy.passes:
        counts = _covariance_pass(model, task, loader, layers, args, fitted)
    second = next((p for p in ("correction", "diagonal") if p in strategy.passes), None)
    if second:
        second_counts = _second_pass(model, task, loader, layers, args, fitted, second)
        counts = counts or second_counts
    draws = args.label_samples if args.fisher == "true" else 1
    sequences, tokens = (counts.sequences // draws, counts.tokens // draws) if counts else (0, 0)
    factors = Factors(strategy.name, fitted, sequences, tokens, model_fingerprint(model, layers), args.saved())
    if out is None:
        return factors
    if dist.is_main():
        factors.save(out, release=True)
    dist.barrier()
    return Factors.load(out, device=model_device(model))


def _covariance_pass(model, task, loader, layers, args: FactorArguments, fitted: dict) -> _Counts:
    """A and S summed over this rank's batches, all-reduced, then eigendecomposed layer by layer."""
    dtype, device = _accumulation_dtype(model, args), model_device(model)
    act = _Sums({layer.name: (layer.gradient_shape[1],) * 2 for layer in layers}, dtype, device)
    grad = _Sums({layer.name: (layer.out_features,) * 2 for layer in layers}, dtype, device)
    counts = _Counts()

    def visit(acts, grads, mask, n):
        rows = _Rows(mask, *next(iter(acts.values())).shape[:2])
        for name in acts:
            act.add_gram(name, rows.real(acts[name]))
            grad.add_gram(name, rows.real(grads[name]))
        counts.add(mask, acts, n)

    _each_capture(model, task, loader, layers, args, "covariance", visit)
    counts.all_reduce()
    act.all_reduce(), grad.all_reduce()
    for i, (name, lf) in enumerate(fitted.items()):  # one layer in float64 at a time
        a_cov = act.values.pop(name).double() / counts.tokens
        s_cov = _split_outputs(grad.values.pop(name).double() / counts.sequences, name, args.split_outputs)
        _eigendecompose(lf, a_cov, s_cov, dist.owner(i), _storage_dtype(model, args), args.covariances)
    return counts


def _storage_dtype(model: nn.Module, args: FactorArguments) -> torch.dtype:
    """Factors keep the model's compute precision (float64 for float64 models, else float32)
    unless ``args.dtype`` says otherwise."""
    if args.dtype is not None:
        return getattr(torch, args.dtype)
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def _eigendecompose(lf: LayerFactors, a_cov: torch.Tensor, s_cov: torch.Tensor, owner: int,
                    dtype: torch.dtype, keep_covariances: bool) -> None:
    """Q_A, Q_S and their eigenvalues, computed in float64 by the owning rank and broadcast."""
    if dist.rank() == owner:  # eigh returns column-major eigenvectors; collectives need contiguous ones
        a_val, a_vec = (t.contiguous() for t in torch.linalg.eigh(a_cov))
        s_val, s_vec = (t.contiguous() for t in torch.linalg.eigh(s_cov))
    else:
        a_val, a_vec, s_val, s_vec = (torch.empty_like(t) for t in (a_cov[0], a_cov, s_cov[0], s_cov))
    for t in (a_val, a_vec, s_val, s_vec):
        dist.broadcast(t, owner)
    lf.activation_eigenvalues, lf.activation_eigenvectors = a_val.to(dtype), a_vec.to(dtype)
    lf.gradient_eigenvalues, lf.gradient_eigenvectors = s_val.to(dtype), s_vec.to(dtype)
    if keep_covariances:
        lf.activation_covariance, lf.gradient_covariance = a_cov.to(dtype), s_cov.to(dtype)


def _second_pass(model, task, loader, layers, args: FactorArguments, fitted: dict, pass_name: str) -> _Counts:
    """EK-FAC's corrected eigenvalues (in the fitted eigenbases) or the diagonal Fisher."""
    sums = _Sums({layer.name: layer.gradient_shape for layer in layers}, _accumulation_dtype(model, args),
                 model_device(model))
    counts = _Counts()
    basis = {name: (lf.gradient_eigenvectors, lf.activation_eigenvectors) for name, lf in fitted.items()}

    def visit(acts, grads, mask, n):
        rows = _Rows(mask, *next(iter(acts.values())).shape[:2])
        for name in acts:
            a, g = acts[name], grads[name]
            if pass_name == "correction":  # Q_S^T G Q_A = sum_t (Q_S^T g_t)(Q_A^T a_t)^T, real tokens only
                q_s, q_a = basis[name]
                sums.add_squares(name, rows.per_sequence(rows.real(g) @ q_s.to(g), rows.real(a) @ q_a.to(a)))
            else:
                sums.add(name, per_sequence(g, a).square_().sum(0))
        counts.add(mask, acts, n)

    _each_capture(model, task, loader, layers, args, pass_name, visit)
    counts.all_reduce()
    sums.all_reduce()
    dtype = _storage_dtype(model, args)
    for name, lf in fitted.items():
        value = (sums.values.pop(name).double() / counts.sequences).to(dtype)
        if pass_name == "correction":
            lf.corrected_eigenvalues = value
        else:
            lf.diagonal = value
    return counts


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

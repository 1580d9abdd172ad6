"""Kronecker-structured random projection of per-layer gradients, and the whitening that moves half
of the pretraining-side inverse onto documents (multi-stage retrieval).

Per tracked layer with gradient G (out, in[+1]) the projection is

    P(G) = P_S^T G P_A        P_S: (out, k_out),  P_A: (in[+1], k_in),  entries N(0, 1/k)

with P_S's entries of variance 1/k_out and P_A's of variance 1/k_in, drawn independently, so
E[P_S P_S^T] = I and E[P_A P_A^T] = I and the projection preserves inner products in expectation:

    E[<P(U), P(G)>] = E[tr(P_A^T U^T P_S P_S^T G P_A)] = tr(U^T G) = <U, G>.

A factor whose k reaches its dimension is the identity (exact, and cheaper than a random square
matrix), so a projector as large as the gradients scores exactly.

Documents are projected without forming G, from the (a, g) pairs of one capture:

    P_S^T G P_A = sum_t (P_S^T g_t)(P_A^T a_t)^T

The projected vector of a sequence is the row-major flattening of every layer's (k_out, k_in)
block, concatenated in the projector's layer order. A score estimate is <P(u), P(G_doc)>.

Document norms (for gradient-cosine) are exact, ||G||_F^2 summed over layers, computed in the
same pass (see :func:`gradient_sq_norms`); the projected vector's own norm is only an unbiased
estimate of it and is not used.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .curvature import get_strategy
from .gradients import capture
from .storage import save_tensors
from .tasks import Task
from .text import shortest_first
from .tracking import TrackedLayer

FORMAT = "msif-projector"


def factor_dims(shape: tuple[int, int], dim_per_layer: int) -> tuple[int, int]:
    """(k_out, k_in) with k_out * k_in close to ``dim_per_layer``, each clipped at its dimension.

    Balanced split: k_in = floor(sqrt(d)), k_out = d // k_in; where one side is clipped, the other
    side gets what is left (up to its own dimension).
    """
    out, inp = shape
    if dim_per_layer < 1:
        raise ValueError(f"dim_per_layer must be >= 1, got {dim_per_layer}")
    k_in = min(inp, max(1, math.isqrt(dim_per_layer)))
    k_out = min(out, max(1, dim_per_layer // k_in))
    k_in = min(inp, max(k_in, dim_per_layer // k_out))
    return k_out, k_in


def _layer_seed(seed: int, name: str, side: str) -> int:
    """A 63-bit seed that depends only on (seed, layer name, side): subsets of layers keep theirs."""
    digest = hashlib.sha256(f"{seed}/{name}/{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _gaussian(seed: int, name: str, side: str, dim: int, k: int) -> torch.Tensor | None:
    """(dim, k) with N(0, 1/k) entries, float32; None stands for the identity (k == dim)."""
    if k >= dim:
        return None
    g = torch.Generator().manual_seed(_layer_seed(seed, name, side))
    return (torch.randn(dim, k, generator=g, dtype=torch.float64) / math.sqrt(k)).float()


def _apply(x: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """x @ P over the last axis (P = identity when None)."""
    return x if p is None else x @ p


@dataclass(frozen=True)
class LayerProjection:
    name: str
    shape: tuple[int, int]  # G: (out, in[+1])
    k: tuple[int, int]  # (k_out, k_in)

    @property
    def dim(self) -> int:
        return self.k[0] * self.k[1]


class KroneckerProjector:
    """Seeded per-layer Gaussian pairs (P_S, P_A); P(G) = P_S^T G P_A, flattened and concatenated.

    ``shapes`` maps layer name -> gradient shape (out, in[+1]) in the order the vector is laid
    out. ``dim_per_layer`` picks (k_out, k_in) per layer by :func:`factor_dims`; ``dims`` overrides
    it per layer with explicit (k_out, k_in). The matrices are a function of (seed, name, shape, k)
    only, so ``seed`` plus the layout regenerate them.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], dim_per_layer: int = 64, seed: int = 0,
                 dims: Mapping[str, Sequence[int]] | None = None):
        dims = dict(dims or {})
        unknown = set(dims) - set(shapes)
        if unknown:
            raise ValueError(f"dims given for layers that are not projected: {sorted(unknown)[:5]}")
        self.seed = int(seed)
        self.layers: list[LayerProjection] = []
        for name, shape in shapes.items():
            out, inp = (int(s) for s in shape)
            if name in dims:
                k_out, k_in = (int(k) for k in dims[name])
                if k_out < 1 or k_in < 1:
                    raise ValueError(f"{name}: projection dims must be >= 1, got {(k_out, k_in)}")
                k = (min(out, k_out), min(inp, k_in))
            else:
                k = factor_dims((out, inp), dim_per_layer)
            self.layers.append(LayerProjection(name, (out, inp), k))
        if not self.layers:
            raise ValueError("a projector needs at least one layer")
        self.matrices: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {
            layer.name: (_gaussian(self.seed, layer.name, "S", layer.shape[0], layer.k[0]),
                     _gaussian(self.seed, layer.name, "A", layer.shape[1], layer.k[1]))
            for layer in self.layers}
        self._converted: dict[tuple, tuple] = {}  # (name, device, dtype) -> (source, converted)

    @classmethod
    def for_layers(cls, layers: Sequence[TrackedLayer], dim_per_layer: int | None = None, *,
                   total_dim: int | None = None, seed: int = 0,
                   dims: Mapping[str, Sequence[int]] | None = None) -> KroneckerProjector:
        """Projector for tracked layers: give ``dim_per_layer``, or ``total_dim`` split evenly."""
        if (dim_per_layer is None) == (total_dim is None):
            raise ValueError("give exactly one of dim_per_layer and total_dim")
        if total_dim is not None:
            dim_per_layer = max(1, total_dim // len(layers))
        return cls({layer.name: layer.gradient_shape for layer in layers}, dim_per_layer, seed, dims)

    @property
    def dim(self) -> int:
        """D, the length of a projected vector."""
        return sum(layer.dim for layer in self.layers)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def layout(self) -> list[dict[str, Any]]:
        return [{"name": layer.name, "shape": list(layer.shape), "k": list(layer.k)} for layer in self.layers]

    def check_compatible(self, layers: Sequence[TrackedLayer]) -> None:
        """Raise ValueError unless ``layers`` are this projector's layers, same order and shapes."""
        given = [(layer.name, tuple(layer.gradient_shape)) for layer in layers]
        mine = [(layer.name, layer.shape) for layer in self.layers]
        if given != mine:
            raise ValueError(f"tracked layers do not match the projector's: given {given[:3]}..., "
                             f"projector {mine[:3]}... ({len(given)} vs {len(mine)} layers)")

    # -- projecting -------------------------------------------------------------------------
    def _matrices_like(self, x: torch.Tensor, name: str):
        """(P_S, P_A) of a layer on x's device and dtype, converted once per (device, dtype)."""
        source = self.matrices[name]
        key = (name, x.device, x.dtype)
        cached = self._converted.get(key)
        if cached is None or cached[0] is not source:  # first use, or the matrices were replaced
            cached = (source, tuple(None if m is None else m.to(device=x.device, dtype=x.dtype)
                                    for m in source))
            self._converted[key] = cached
        return cached[1]

    def project_gradients(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(N, D) projections of in-memory gradients (N, out, in[+1]) per layer, e.g. query u."""
        missing = [n for n in self.layer_names if n not in grads]
        if missing:
            raise KeyError(f"gradients missing for projected layers: {missing[:5]}")
        parts = []
        for layer in self.layers:
            g = grads[layer.name]
            p_s, p_a = self._matrices_like(g, layer.name)
            if tuple(g.shape[1:]) != layer.shape:
                raise ValueError(f"{layer.name}: gradient shape {tuple(g.shape[1:])}, expected {layer.shape}")
            # P_S^T G P_A = ((G P_A)^T P_S)^T
            projected = _apply(_apply(g, p_a).transpose(1, 2), p_s).transpose(1, 2)
            parts.append(projected.reshape(g.shape[0], -1))
        return torch.cat(parts, dim=1)

    def project_captured(self, acts: Mapping[str, torch.Tensor],
                         grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, D) from one capture, without forming G: sum_t (P_S^T g_t)(P_A^T a_t)^T."""
        parts = []
        for layer in self.layers:
            p_s, p_a = self._matrices_like(acts[layer.name], layer.name)
            pg, pa = _apply(grads[layer.name], p_s), _apply(acts[layer.name], p_a)
            parts.append(torch.einsum("bto,bti->boi", pg, pa).flatten(1))
        return torch.cat(parts, dim=1)

    # -- storage ----------------------------------------------------------------------------
    def checksum(self) -> str:
        """sha256 over the layout and the matrices' float32 bytes."""
        digest = hashlib.sha256(json.dumps(self.layout()).encode())
        for layer in self.layers:
            for m in self.matrices[layer.name]:
                digest.update(b"I" if m is None else m.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def save(self, path: str | os.PathLike, include_matrices: bool = False,
             metadata: Mapping[str, Any] | None = None) -> None:
        """Safetensors file with seed, layout and checksum; the matrices only when asked.

        Written atomically (temporary file in the same folder, then a rename). Without the
        matrices, :meth:`load` regenerates them from the seed and checks the checksum.
        """
        tensors = {}
        if include_matrices:
            for layer in self.layers:
                for side, m in zip(("P_S", "P_A"), self.matrices[layer.name]):
                    if m is not None:
                        tensors[f"{layer.name}/{side}"] = m.contiguous()
        meta = {"format": FORMAT, "engine_version": __version__, "seed": str(self.seed),
                "layers": json.dumps(self.layout()), "dim": str(self.dim),
                "sha256": self.checksum(), "metadata": json.dumps(dict(metadata or {}))}
        save_tensors(tensors, path, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> KroneckerProjector:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an msif projector file (format={meta.get('format')!r})")
        layout = json.loads(meta["layers"])
        projector = cls({entry["name"]: entry["shape"] for entry in layout}, seed=int(meta["seed"]),
                        dims={entry["name"]: entry["k"] for entry in layout})
        stored = load_file(str(path))
        for key, value in stored.items():
            name, _, side = key.rpartition("/")
            p_s, p_a = projector.matrices[name]
            projector.matrices[name] = (value, p_a) if side == "P_S" else (p_s, value)
        if projector.checksum() != meta["sha256"]:
            raise ValueError(f"{path}: the projection matrices do not match the recorded checksum "
                             "(regenerated with another torch random generator?); save the projector "
                             "with include_matrices=True to carry them explicitly")
        return projector

    @staticmethod
    def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("metadata", "{}"))


def gradient_sq_norms(acts: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Exact ||G_b||_F^2 summed over layers, (B,) float64, with G_b = sum_t g_bt a_bt^T.

    Per layer the cheaper of two exact forms: forming G costs T*out*in multiply-adds per sequence;
    the Gram form ||G||^2 = sum_{t,s} (g_t . g_s)(a_t . a_s) costs T^2*(out+in). For long sequences
    through wide layers (Pythia-2.8B MLP, T=512) the Gram form is about 4x cheaper than forming G,
    and about a quarter of the layer's forward cost.
    """
    total = None
    for name, a in acts.items():
        g = grads[name]
        t, out, inp = a.shape[1], g.shape[-1], a.shape[-1]
        if t * (out + inp) < out * inp:
            sq = ((g @ g.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum((1, 2))
        else:
            sq = torch.einsum("bto,bti->boi", g, a).square().sum((1, 2))
        sq = sq.double()
        total = sq if total is None else total + sq
    return total


@dataclass
class ProjectedDocuments:
    """One batch of documents: projected gradients (N, D), when asked exact squared norms ||G||^2
    (N,) and whitened eigen-coordinates (N, D'); ``positions``: where its rows were in the input
    (batches are scored shortest first: :func:`engine.text.shortest_first`)."""

    vectors: np.ndarray
    sq_norms: np.ndarray | None = None
    whitened: np.ndarray | None = None
    positions: np.ndarray | None = None

    @classmethod
    def concatenate(cls, parts: Sequence[ProjectedDocuments]) -> ProjectedDocuments:
        """The batches as one, rows back in input order."""
        order = np.argsort(np.concatenate([p.positions for p in parts]), kind="stable")

        def joined(name: str) -> np.ndarray | None:
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else np.concatenate(values)[order]

        return cls(joined("vectors"), joined("sq_norms"), joined("whitened"), joined("positions"))

    def normalized(self) -> np.ndarray:
        """vectors / ||G|| (exact norms): for gradient-cosine, <P(u), P(G)/||G||> estimates cosine."""
        if self.sq_norms is None:
            raise ValueError("exact norms were not computed; project with norms=True")
        norms = np.sqrt(self.sq_norms).clip(min=1e-30)
        return (self.vectors / norms[:, None]).astype(self.vectors.dtype)


def iter_projected_documents(model: nn.Module, task: Task, loader: Iterable[Any],
                             layers: Sequence[TrackedLayer], projector: KroneckerProjector, *,
                             norms: bool = False, whitening: Whitening | None = None,
                             dtype=np.float32, progress: bool = True) -> Iterator[ProjectedDocuments]:
    """One :class:`ProjectedDocuments` per batch of ``loader`` (one capture each, shared by the
    projection, the norms and the whitening): for streaming into shards or an index."""
    projector.check_compatible(layers)
    for batch, rows in shortest_first(tqdm(loader, desc="projecting", disable=not progress, unit="batch", leave=False)):
        acts, grads, _ = capture(model, task, batch, layers)
        with torch.no_grad():
            vectors = projector.project_captured(acts, grads).cpu().numpy().astype(dtype)
            sq = gradient_sq_norms(acts, grads).cpu().numpy() if norms else None
            white = (whitening.document_vectors(acts, grads).cpu().numpy().astype(dtype)
                     if whitening is not None else None)
        del acts, grads  # not held across the yield: the next batch's capture would double them
        yield ProjectedDocuments(vectors, sq, white, np.asarray(rows))


def project_documents(model: nn.Module, task: Task, loader: Iterable[Any],
                      layers: Sequence[TrackedLayer], projector: KroneckerProjector, *,
                      norms: bool = False, dtype=np.float32, progress: bool = True) -> ProjectedDocuments:
    """All documents of ``loader`` projected: vectors (N, D) (float32 by default), and exact
    ||G||^2 (N,) when ``norms``."""
    parts = list(iter_projected_documents(model, task, loader, layers, projector, norms=norms,
                                          dtype=dtype, progress=progress))
    if not parts:
        return ProjectedDocuments(np.zeros((0, projector.dim), dtype),
                                  np.zeros(0) if norms else None)
    return ProjectedDocuments.concatenate(parts)


@dataclass(frozen=True)
class _Kept:
    """One layer's kept eigen-coordinates (i, j), in decreasing order of Lambda."""

    flat: torch.Tensor  # (keep,) positions in the row-major flattened (out, in[+1]) eigenbasis
    rows: torch.Tensor  # the distinct i among them, sorted
    cols: torch.Tensor  # the distinct j
    pairs: torch.Tensor  # (keep,) position of each (i, j) in the flattened (rows, cols) grid
    scale: torch.Tensor  # (keep,) sqrt(Lambda + lambda) there
    q_s: torch.Tensor | None  # Q_S[:, rows] (out, |rows|); None: the basis is the identity
    q_a: torch.Tensor | None  # Q_A[:, cols] (in[+1], |cols|)

    def of_tokens(self, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """(B, keep): (Q_S^T G Q_A) at the kept coordinates for G = sum_t g_t a_t^T, from g
        (B, T, out) and a (B, T, in[+1]) without forming G."""
        gp = g @ self.q_s.to(g) if self.q_s is not None else g[..., self.rows.to(g.device)]
        ap = a @ self.q_a.to(a) if self.q_a is not None else a[..., self.cols.to(a.device)]
        return torch.einsum("bti,btj->bij", gp, ap).flatten(1)[:, self.pairs.to(g.device)]

    def of_matrices(self, u: torch.Tensor) -> torch.Tensor:
        """(Q, keep): (Q_S^T u Q_A) at the kept coordinates for u (Q, out, in[+1])."""
        left = self.q_s.to(u).T @ u if self.q_s is not None else u[:, self.rows.to(u.device)]
        grid = left @ self.q_a.to(u) if self.q_a is not None else left[..., self.cols.to(u.device)]
        return grid.flatten(1)[:, self.pairs.to(u.device)]


class Whitening:
    """Half of the pretraining-side inverse moved onto the documents, for multi-stage retrieval.

    With H_pt + lambda I = Q diag(Lambda + lambda) Q^T (EK-FAC, per layer) and any query vector u,

        <u, G> = <Q^T u Q * sqrt(Lambda + lambda),  Q^T G Q / sqrt(Lambda + lambda)>

    (both sides in the eigenbasis; the scalings cancel). The multi-stage u contains
    (H_pt + lambda I)^-1, so its raw form is nearly orthogonal to every document gradient and a
    random projection drowns the signal; after this split both sides are "half-preconditioned"
    and projected inner products keep their ranking. Only the top-``keep`` coordinates per layer
    are kept, and a document's are gathered in token space without forming G:

        (Q_S^T G Q_A)[i, j] = sum_t (Q_S[:, i] . g_t) (Q_A[:, j] . a_t)

    so a document costs T (out |I| + in |J| + |I| |J|) per layer for the distinct rows I and
    columns J of its kept coordinates, instead of forming G (T out in) and rotating it
    (out^2 in + out in^2). The index then depends on the pretraining factors and lambda, which
    are fixed per study.
    """

    def __init__(self, factors, damping: Mapping[str, float] | Callable[[Any], float], keep: int | None = None):
        self.strategy = get_strategy(factors.strategy)
        self.factors = factors
        # The top-``keep`` eigen-coordinates per layer (largest Lambda): deterministic, and measured far
        # better than a random projection, or than picking coordinates by the queries' expected energy
        # (docs/vector_storage.md). A layer at a time, read once: ``damping`` is lambda per layer name,
        # or a function of the layer's factors.
        self.damping, self.coordinates = {}, {}
        for name in factors.layers:
            layer = factors.layers[name]
            self.damping[name] = damping[name] if isinstance(damping, Mapping) else damping(layer)
            self.coordinates[name] = self._kept(layer, self.damping[name], keep)

    def _kept(self, lf, damping: float, keep: int | None) -> _Kept:
        lam = self.strategy.eigenvalues(lf)
        if lam is None:
            raise ValueError(f"whitening needs curvature eigenvalues; {self.factors.strategy} has none")
        width = lam.shape[-1]
        values = lam.flatten()
        # stable: equal eigenvalues keep index order, the same on every device and torch build
        # (topk's order of ties is unspecified), so documents projected on one machine and queries
        # whitened on another agree coordinate for coordinate; clone: a slice would keep the whole
        # out * in argsort alive
        flat = torch.argsort(values, descending=True, stable=True)[:keep].clone()
        i, j = flat // width, flat % width
        rows, cols = torch.unique(i), torch.unique(j)
        pairs = torch.searchsorted(rows, i) * len(cols) + torch.searchsorted(cols, j)
        scale = torch.sqrt(values[flat].double() + damping).to(lam.dtype)
        q_s, q_a = self.strategy.basis(lf)
        return _Kept(flat, rows, cols, pairs, scale, None if q_s is None else q_s[:, rows].contiguous(),
                     None if q_a is None else q_a[:, cols].contiguous())

    @property
    def kept(self) -> dict[str, torch.Tensor]:
        """Per layer, the kept positions in the flattened eigenbasis (largest Lambda first)."""
        return {name: k.flat for name, k in self.coordinates.items()}

    @property
    def dim(self) -> int:
        """Length of :meth:`document_vectors` rows: kept coordinates over all layers."""
        return sum(len(k.flat) for k in self.coordinates.values())

    def document_vectors(self, acts: Mapping[str, torch.Tensor],
                         grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, dim): each document's whitened gradient on the kept eigen-coordinates, from one
        capture's (a, g) in token space (G is never formed)."""
        parts = []
        for name, k in self.coordinates.items():
            values = k.of_tokens(grads[name], acts[name])
            parts.append(values / k.scale.to(values))
        return torch.cat(parts, 1)

    def query_vectors(self, vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(Q, dim): the matching query side; <query_vectors, document_vectors> -> <u, G> as keep grows."""
        parts = []
        for name, k in self.coordinates.items():
            values = k.of_matrices(vectors[name])
            parts.append(values * k.scale.to(values))
        return torch.cat(parts, 1)

    def documents(self, acts: Mapping[str, torch.Tensor],
                  grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """(B, out, in[+1]) per layer: Q^T G Q / sqrt(Lambda + lambda) from one capture, formed in
        full (the reference :meth:`document_vectors` is tested against; small models only)."""
        out = {}
        for name, a in acts.items():
            lf = self.factors.layers[name]
            g = torch.einsum("bto,bti->boi", grads[name], a)
            out[name] = self.strategy.to_eigenbasis(lf, g) / self._scale(name).to(g)
        return out

    def queries(self, vectors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """(Q, out, in[+1]) per layer: Q^T u Q * sqrt(Lambda + lambda), in full."""
        return {name: self.strategy.to_eigenbasis(self.factors.layers[name], u) * self._scale(name).to(u)
                for name, u in vectors.items()}

    def _scale(self, name: str) -> torch.Tensor:
        lam = self.strategy.eigenvalues(self.factors.layers[name])
        return torch.sqrt(lam.double() + self.damping[name])

"""The study's search index (the index stage's files and their reader).

Two kinds of document vectors are searched (``engine.study.vectors``): ``projected`` (unit-scale
projected raw gradients: gradient-cosine; times the exact norms: gradient-dot and
pt-inverse-dropped) and ``whitened`` (multi-stage). Each is served in one of two ways, chosen by
corpus size:

    flat  an exhaustive scan of the memory-mapped shards (exact; small studies)
    pca   a staged search (``engine.search.staged_search``): the first ``index_dims`` principal
          coordinates of every document, fit on a sample of real vectors, scanned in full from a
          memory-mapped (N, P) float32 file; the best ``rerank`` per sign re-scored with their full
          rows read from the shards

Cosine and dot scores share one set of files: the norms are stored, not a second index. The
build reads one shard at a time; the kind, its settings and the recall measured against a full
scan are recorded with the index stage in the manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import numpy as np

from ..retrieval import Retrieval
from ..search import PCABasis, scan, staged_search
from ..storage import atomic_path, save_npy
from . import layout
from .manifest import Study, StudyError
from .vectors import DocumentVectors

VECTOR_KINDS = ("projected", "whitened")
INDEX_KINDS = ("auto", "flat", "pca")
HOLD_BYTES = 512 * 2**20  # a scanned kind's float32 rows up to this size are held in memory after first use
FLAT_LIMIT = 20_000  # documents: up to here an exhaustive scan of the shards is fast enough (auto)


@dataclass(frozen=True)
class IndexSettings:
    kind: str = "auto"  # auto | flat | pca
    dims: int = 256  # principal coordinates scanned in the coarse stage (pca)
    rerank: int = 2000  # candidates per sign re-scored with full vectors (pca)
    sample: int = 16_384  # documents the principal directions are fit on (pca)
    seed: int = 0

    def __post_init__(self):
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index must be one of {', '.join(INDEX_KINDS)}, got {self.kind!r}")
        if min(self.dims, self.rerank, self.sample) < 1:
            raise ValueError("index_dims, rerank and index_sample must be >= 1")

    def resolved(self, documents: int) -> str:
        if self.kind != "auto":
            return self.kind
        return "pca" if documents > FLAT_LIMIT else "flat"


def build_index(study: Study, settings: IndexSettings, probes: dict[str, np.ndarray] | None = None,
                progress: bool = False) -> tuple[list[str], dict]:
    """Write the index files (none for ``flat``); returns them and the record for the manifest.

    ``probes``: query vectors per vector kind, to measure recall of the served search against an
    exhaustive scan (recorded; the index works without them).
    """
    vectors = DocumentVectors.of(study)
    kind = settings.resolved(vectors.documents)
    record = {**asdict(settings), "configured": settings.kind, "kind": kind, "documents": vectors.documents,
              "whitened_norms": layout.INDEX_NORMS.path}
    files = [_save_whitened_norms(study, vectors)]
    if kind == "pca":
        for name in VECTOR_KINDS:
            record[name] = _build_pca(study, vectors, name, settings, progress)
            files += [layout.index_file(name, "prefix"), layout.index_file(name, "basis")]
    if probes and kind == "pca":  # a flat index is the scan itself
        index = StudyIndex(study, record)
        record["recall"] = {name: index.measure(name, q) for name, q in probes.items()}
    return files, record


def _save_whitened_norms(study: Study, vectors: DocumentVectors) -> str:
    """Every document's whitened-row norm, a shard at a time (4 bytes a document)."""
    norms = np.empty(vectors.documents, np.float32)
    for start, rows in vectors.numbered_chunks("whitened"):
        norms[start:start + len(rows)] = np.sqrt(np.square(rows, dtype=np.float64).sum(1))
    save_npy(study.path(layout.INDEX_NORMS), norms)
    return layout.INDEX_NORMS.path


def _build_pca(study: Study, vectors: DocumentVectors, name: str, settings: IndexSettings,
               progress: bool) -> dict:
    """Fit the basis on whole, evenly spread shards (sequential reads), then transform every shard."""
    from tqdm.auto import tqdm

    wanted = max(1, -(-settings.sample // vectors.shard_size))
    picked = np.unique(np.linspace(0, vectors.shards - 1, min(wanted, vectors.shards)).round().astype(int))
    sample = np.concatenate([rows for _, rows in vectors.numbered_chunks(name, picked.tolist())])
    basis = PCABasis.fit(sample, settings.dims, settings.seed)
    some = sample[:: max(1, len(sample) // 4096)]
    variance = float(basis.transform(some).var(0).sum() / some.var(0).sum())
    del sample, some
    basis.save(study.path(layout.index_file(name, "basis")))
    with atomic_path(study.path(layout.index_file(name, "prefix"))) as tmp:
        prefix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                           shape=(vectors.documents, basis.dims))
        for start, rows in tqdm(vectors.numbered_chunks(name), total=vectors.shards, disable=not progress,
                                desc=f"index ({name})", unit="shard"):
            prefix[start:start + len(rows)] = basis.transform(rows)
        prefix.flush()
        del prefix
    return {"dims": basis.dims, "sampled_documents": int(len(picked) * vectors.shard_size),
            "variance_kept": variance}


class VectorSearch:
    """Top-k of one vector kind for query vectors (Q, D), both signs: a scan or the staged search."""

    def __init__(self, vectors: DocumentVectors, name: str, kind: str, rerank: int,
                 prefix: np.ndarray | None = None, basis: PCABasis | None = None):
        self.vectors, self.name, self.kind, self.rerank = vectors, name, kind, rerank
        self.prefix, self.basis = prefix, basis
        self._held: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return self.vectors.dim(self.name)

    def search(self, queries, k: int, weights: np.ndarray | None = None, clock: dict | None = None) -> Retrieval:
        """``clock`` receives the seconds of the steps of a staged search."""
        k = min(int(k), self.vectors.documents)
        if self.kind == "flat":
            return self.scan(queries, k, weights)
        return staged_search(self.prefix, self.basis, partial(self.vectors.gather, self.name), queries, k,
                             self.rerank, weights, clock)

    def scan(self, queries, k: int, weights: np.ndarray | None = None) -> Retrieval:
        """Exhaustive: every full row (the reference the staged search is measured against)."""
        return scan(self._rows(), queries, min(int(k), self.vectors.documents), weights)

    def _rows(self):
        """A small corpus's rows decoded once and held (a demo query then skips decoding 16-bit
        rows); a large one's read a shard at a time."""
        if self._held is None and self.vectors.documents * self.dim * 4 <= HOLD_BYTES:
            self._held = np.concatenate([rows for _, rows in self.vectors.numbered_chunks(self.name)])
        return [(0, self._held)] if self._held is not None else self.vectors.numbered_chunks(self.name)


class StudyIndex:
    """The index stage's search over a study's vectors (memory-mapped; nothing loaded whole)."""

    def __init__(self, study: Study, record: dict):
        if "whitened_norms" not in record:
            raise StudyError(f"the index of {study.root} predates normalised rankings (it has no whitened norms); "
                             f"run `{study.rebuild_command()}` to add them (it reruns the index stage only)")
        self.record = record
        self.vectors = DocumentVectors.of(study)
        self._norms: np.ndarray | None = None
        self.whitened_norms: np.ndarray = np.load(study.path(record["whitened_norms"]))
        self.searches = {}
        for name in VECTOR_KINDS:
            prefix = basis = None
            if record["kind"] == "pca":
                prefix = np.load(study.path(layout.index_file(name, "prefix")), mmap_mode="r")
                basis = PCABasis.load(study.path(layout.index_file(name, "basis")))
            self.searches[name] = VectorSearch(self.vectors, name, record["kind"], record["rerank"], prefix, basis)

    @classmethod
    def of(cls, study: Study) -> StudyIndex:
        return cls(study, study.manifest()["stages"][layout.Stage.INDEX]["search"])

    @property
    def kind(self) -> str:
        return self.record["kind"]

    @property
    def norms(self) -> np.ndarray:
        """Exact gradient norms (documents,), read once: projected rows times these are raw gradients."""
        if self._norms is None:
            self._norms = np.sqrt(self.vectors.sq_norms()).astype(np.float32)
        return self._norms

    def search(self, name: str, queries, k: int, weights: np.ndarray | None = None,
               clock: dict | None = None) -> Retrieval:
        """Top-k of ``<q, row> * weight`` per document: e.g. the exact norms scale projected rows
        back to raw gradients (gradient-dot), and dividing weights give normalised rankings."""
        return self.searches[name].search(queries, k, weights, clock)

    def measure(self, name: str, queries, ks: tuple[int, ...] = (10, 100)) -> dict:
        """Recall@k of the served proponents against an exhaustive scan, averaged over queries."""
        served = self.search(name, queries, max(ks))
        truth = self.searches[name].scan(queries, max(ks))
        out = {"queries": int(len(served.proponent_ids))}
        for k in ks:
            hits = [len(set(a[:k].tolist()) & set(b[:k].tolist())) / min(k, len(b))
                    for a, b in zip(served.proponent_ids, truth.proponent_ids)]
            out[f"at_{k}"] = float(np.mean(hits))
        return out


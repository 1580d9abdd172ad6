"""Top-k search of document vectors that stay on disk: an exhaustive scan, and a staged search.

Scores are inner products <q, w_i> (times an optional per-document weight, e.g. the exact
gradient norm that turns unit-scale rows back into raw gradients). Both signs come from one
product: proponents are the k highest scores, opponents the k lowest. Results are
:class:`engine.Retrieval` objects (``projected_*`` = these vector scores, estimates of influence).

The staged search is for corpora whose vectors do not fit in memory:

1. coarse: every document's coordinates in a P-dim basis V (``PCABasis``) approximate its score,
   <q, w> ~= <q, mean> + <V^T q, V^T (w - mean)>, plus a k-dim count sketch of what V leaves out
   (``ResidualSketch``: unbiased for any query). The study fits V on *queries* (the principal
   directions of preconditioned fine-tuning records, uncentred: mean = 0), so that q ~= V V^T q and the
   error <q - V V^T q, w> is small whatever the document; fit on documents, a templated query kept a
   third of its energy and the sources of half the facts fell out of the coarse stage's top 2,000
   (measured on a 32k haystack). They live in a faiss
   inverted file (``IVFLists``: IndexIVFFlat, spherical k-means, lists on disk and memory-mapped): a
   query visits the ``nprobe`` lists whose centroids point most along q (and, for opponents, along -q),
   so a search reads a fixed share of the corpus, not all of it. The few documents whose weight
   times norm is largest (a ``Band``) are always scored too: raw rankings are made of them;
   For the study's default ranking the coarse stage is instead a compressed scan of every document
   (``CodeScan``: the coordinates times that ranking's weights, product-quantised to 4 bits a
   coordinate, faiss's fast-scan kernels): a normalised ranking's best documents are spread over
   many lists, which visiting a share of the lists misses (measured at 10^6 simulated documents:
   0.70 of the scan's top 10 at 6.5% of the lists, 0.91 at 26%), while the codes of 10^6 documents
   (122 MiB) are scanned whole in about 10 ms;
2. re-rank: the best ``rerank`` per sign are re-scored with their full rows (read from the shards);
3. the caller re-scores the best of those exactly (``engine.rescore``).
Recall of stage 1 + 2 against the exhaustive scan must be measured on the corpus at hand. faiss picks
the lists and stores them; the visited lists' rows are scored here, because a ranking weighs each
document (its norm, or a normalisation's divisor) and faiss has no per-document weights.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .retrieval import Retrieval
from .storage import save_tensors

# Full rows are read, decoded and multiplied a block of about this many float32 bytes at a time while
# re-ranking: a block that stays in the CPU's cache. Decoding 4,000 int4 rows of 65,536 numbers and
# multiplying took 0.79 s in blocks of 2,048 rows (512 MiB) and 0.30 s in blocks of 64 (16 MiB), with
# the same scores (one thread, this machine's 32 MiB L3).
RERANK_BLOCK_BYTES = 16 << 20
CHUNK_ROWS = 65_536  # rows of a memory-mapped matrix multiplied at once (64 MiB of a 256-wide prefix)


class TopK:
    """The k highest and k lowest scores per query, over row chunks that arrive in any order."""

    def __init__(self, queries: int, k: int):
        self.k = int(k)
        self.ids = np.zeros((queries, 0), np.int64)
        self.high = np.zeros((queries, 0), np.float32)
        self.low_ids = np.zeros((queries, 0), np.int64)
        self.low = np.zeros((queries, 0), np.float32)

    def add(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """``scores`` (n, Q) of documents ``ids`` (n,)."""
        s = np.ascontiguousarray(scores.T, dtype=np.float32)
        ids = np.broadcast_to(np.asarray(ids, np.int64), s.shape)
        self.ids, self.high = _keep(np.concatenate([self.ids, ids], 1), np.concatenate([self.high, s], 1), self.k)
        low_ids, neg = _keep(np.concatenate([self.low_ids, ids], 1), np.concatenate([-self.low, -s], 1), self.k)
        self.low_ids, self.low = low_ids, -neg

    def result(self) -> Retrieval:
        """Sorted: proponents by decreasing score, opponents by increasing score; ties by id."""
        pro_ids, pro = _sorted(self.ids, self.high)
        opp_ids, neg = _sorted(self.low_ids, -self.low)
        return Retrieval(pro_ids, pro, opp_ids, -neg)


def _keep(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k highest scores per row; of scores tied at the cut, the lowest ids (deterministic)."""
    width = scores.shape[1]
    if width <= k:
        return ids, scores
    cut = np.partition(scores, width - k, axis=1)[:, width - k]
    kept = np.empty((len(scores), k), np.int64)
    for r, (row, value) in enumerate(zip(scores, cut)):
        above = np.flatnonzero(row > value)
        tied = np.flatnonzero(row == value)
        tied = tied[np.argsort(ids[r, tied], kind="stable")][:k - len(above)]
        kept[r] = np.concatenate([above, tied])
    return np.take_along_axis(ids, kept, 1), np.take_along_axis(scores, kept, 1)


def _sorted(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((ids, -scores), axis=1) if scores.size else np.zeros(scores.shape, np.int64)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)


def _queries(queries) -> np.ndarray:
    if torch.is_tensor(queries):
        queries = queries.detach().cpu().numpy()
    q = np.asarray(queries, dtype=np.float32)
    return np.ascontiguousarray(q[None] if q.ndim == 1 else q)


def scan(chunks: Iterable[tuple[int, np.ndarray]], queries, k: int, weights: np.ndarray | None = None,
         offset: np.ndarray | None = None) -> Retrieval:
    """Exhaustive top-k of both signs of ``(rows @ q + offset) * weight`` over ``chunks`` of
    (first row id, float32 rows)."""
    q = _queries(queries)
    top = TopK(len(q), k)
    for start, rows in chunks:
        scores = products(rows, q)
        if offset is not None:
            scores += offset[None]
        if weights is not None:
            scores *= weights[start:start + len(rows), None]
        top.add(scores, np.arange(start, start + len(rows)))
    return top.result()


def products(rows: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(n, Q) = rows @ q.T, multiplied by torch: numpy's BLAS threads would fight torch's OpenMP
    threads, which spin for a while after each decode, for the same cores (4,000 int4 rows of
    65,536 numbers re-ranked in 0.71 s with numpy against 0.25 s with torch, on 2 threads and 2 cores)."""
    rows, q = (np.ascontiguousarray(x, np.float32) for x in (rows, q))
    rows = rows if rows.flags.writeable else rows.copy()  # torch warns on read-only (memory-mapped) arrays
    return (torch.from_numpy(rows) @ torch.from_numpy(q if q.flags.writeable else q.copy()).T).numpy()


def matrix_chunks(matrix: np.ndarray, rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """Row blocks of a (memory-mapped) matrix, as float32."""
    for start in range(0, len(matrix), rows):
        yield start, np.asarray(matrix[start:start + rows], np.float32)


@dataclass
class ResidualSketch:
    """A count sketch C (k x D: each input coordinate added, with a random sign, into one of k) of
    what a basis V leaves out: coordinates C (x - V V^T x) = C x - (C V)(V^T x). Inner products of
    sketched vectors estimate <q - V V^T q, w - V V^T w> without bias, whatever the query, with an
    error that shrinks as 1 / sqrt(k), where the principal part alone misses it: on the 32k haystacks
    the test queries kept 15% of their energy in a basis fit on fine-tuning records, and the
    principal coarse stage lost the served ranking 0.07 of MRR@10 (seed 4) against a full scan of the
    rows. Stored as two (D,) arrays and C V (k, P), not as a dense (D, k) matrix."""

    buckets: np.ndarray  # (D,) int64: the sketch coordinate each input coordinate adds into
    signs: np.ndarray  # (D,) float32, +-1
    of_components: np.ndarray  # (k, P): C V

    @property
    def size(self) -> int:
        return int(self.of_components.shape[0])

    @classmethod
    def draw(cls, components: np.ndarray, size: int, seed: int = 0) -> ResidualSketch:
        rng = np.random.default_rng(seed)
        dim = components.shape[0]
        buckets = rng.integers(0, size, dim)
        signs = rng.choice(np.array([-1.0, 1.0], np.float32), dim)
        of_components = np.asarray(_count_sketch(buckets, signs, size) @ components, np.float32)
        return cls(buckets, signs, of_components)

    @functools.cached_property
    def _matrix(self):
        return _count_sketch(self.buckets, self.signs, self.size)

    def _sketched(self, x: np.ndarray) -> np.ndarray:
        """C x for rows x (n, D): (n, k)."""
        return np.asarray((self._matrix @ np.asarray(x, np.float32).T).T, np.float32)

    def coordinates(self, x: np.ndarray, principal: np.ndarray) -> np.ndarray:
        """(n, k) sketch coordinates of rows x (n, D) whose principal coordinates are ``principal`` (n, P)."""
        return self._sketched(x) - principal @ self.of_components.T


def _count_sketch(buckets: np.ndarray, signs: np.ndarray, size: int):
    """The sparse (size, D) matrix that adds coordinate i, times signs[i], into row buckets[i]."""
    import scipy.sparse

    return scipy.sparse.csr_matrix((signs, (buckets, np.arange(len(buckets)))), shape=(size, len(buckets)),
                                   dtype=np.float32)


@dataclass
class PCABasis:
    """Principal directions of document vectors: ``mean`` (D,), ``components`` (D, P) orthonormal
    columns in decreasing order of variance, so any first p columns are the best p-dim prefix; with a
    ``sketch``, its k coordinates of the residual follow the P principal ones (``dims`` = P + k)."""

    mean: np.ndarray
    components: np.ndarray
    sketch: ResidualSketch | None = None

    @property
    def dims(self) -> int:
        return self.principal_dims + self.sketch_dims

    @property
    def principal_dims(self) -> int:
        return int(self.components.shape[1])

    @property
    def sketch_dims(self) -> int:
        return self.sketch.size if self.sketch is not None else 0

    def with_sketch(self, size: int, seed: int = 0) -> PCABasis:
        """This basis with a ``size``-coordinate count sketch of its residual (none for 0)."""
        return PCABasis(self.mean, self.components, ResidualSketch.draw(self.components, size, seed) if size else None)

    @classmethod
    def fit(cls, sample: np.ndarray, dims: int, seed: int = 0, centre: bool = True) -> PCABasis:
        """Randomised SVD (``torch.svd_lowrank``, seeded) of the sample (n, D) of *unit* rows, centred
        or not. Fit on raw rows, a few documents with huge norms own the leading directions and the
        rest of the corpus is coarsely scored by noise (measured on a 32k haystack, scan recall@10 of
        the raw ranking 0.76, of the cosine ranking 0.67; fit on unit rows: 0.99 and 0.90). The study
        fits its basis on *query* vectors, uncentred (``centre=False``: the mean direction queries
        share is a direction to keep, and the coarse score then has no offset)."""
        x = torch.from_numpy(unit_rows(sample))
        mean = x.mean(0) if centre else torch.zeros(x.shape[1])
        x -= mean  # in place: the sample is the largest thing the build holds
        dims = min(int(dims), *x.shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, _, v = torch.svd_lowrank(x, q=min(dims + 16, *x.shape), niter=4)
        return cls(mean.numpy(), np.ascontiguousarray(v[:, :dims].numpy()))

    @classmethod
    def fit_queries(cls, queries: np.ndarray, documents: np.ndarray, dims: int, seed: int = 0) -> PCABasis:
        """The coarse basis of a study: the uncentred principal directions of the unit query rows (up
        to one per query), then, when there are fewer queries than ``dims``, the documents' principal
        directions outside the queries' span (unit rows, uncentred): the coarse error <q, w> -
        <V^T q, V^T w> = <q - V V^T q, w> is small when either side is nearly inside the basis."""
        dims = min(int(dims), queries.shape[1])
        first = cls.fit(queries, min(dims, len(queries)), seed, centre=False).components
        if first.shape[1] >= dims:
            return cls(np.zeros(queries.shape[1], np.float32), first)
        rest = unit_rows(documents)
        rest -= (rest @ first) @ first.T
        more = cls.fit(rest, dims - first.shape[1], seed, centre=False).components
        more -= first @ (first.T @ more)  # numerically outside the queries' span
        more /= np.maximum(np.linalg.norm(more, axis=0, keepdims=True), 1e-30)
        return cls(np.zeros(queries.shape[1], np.float32), np.ascontiguousarray(np.concatenate([first, more], 1)))

    def transform(self, rows: np.ndarray) -> np.ndarray:
        """(n, dims) coarse coordinates of (n, D) rows: principal, then the residual's sketch."""
        return self._coordinates(np.asarray(rows, np.float32) - self.mean)

    def queries(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(coordinates of q, <q, mean>): the coarse score is <q's, the document's coordinates> + <q, mean>."""
        return self._coordinates(np.asarray(queries, np.float32)), queries @ self.mean

    def _coordinates(self, x: np.ndarray) -> np.ndarray:
        principal = x @ self.components
        if self.sketch is None:
            return principal
        return np.concatenate([principal, self.sketch.coordinates(x, principal)], 1)

    def save(self, path: str | os.PathLike) -> None:
        arrays = {"mean": self.mean, "components": self.components}
        if self.sketch is not None:
            arrays |= {"sketch_buckets": self.sketch.buckets, "sketch_signs": self.sketch.signs,
                       "sketch_of_components": self.sketch.of_components}
        save_tensors({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, path,
                     {"format": "msif-pca-basis"})

    @classmethod
    def load(cls, path: str | os.PathLike) -> PCABasis:
        from safetensors.numpy import load_file

        stored = load_file(str(path))
        sketch = None  # bases written before the sketch have none, and serve as they did
        if "sketch_buckets" in stored:
            sketch = ResidualSketch(stored["sketch_buckets"], stored["sketch_signs"], stored["sketch_of_components"])
        return cls(stored["mean"], stored["components"], sketch)


def unit_rows(rows: np.ndarray) -> np.ndarray:
    """A float32 copy of ``rows`` scaled to unit norm (zero rows stay zero)."""
    x = np.array(rows, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-30))
    return x


@dataclass
class Band:
    """The documents whose weight times row norm is largest, with their coarse coordinates: the
    staged search always scores them in the coarse stage. They are few, but a raw (unnormalised)
    ranking is made of them, and their lists need not be the ones a query visits."""

    ids: np.ndarray  # (H,) sorted
    coordinates: np.ndarray  # (H, P)

    @classmethod
    def heaviest(cls, sizes: np.ndarray, count: int, coordinates: Callable[[np.ndarray], np.ndarray]) -> Band:
        """The ``count`` (>= 1) documents of largest ``sizes`` (weight x row norm), with
        ``coordinates(sorted ids) -> (H, P)``."""
        count = min(int(count), len(sizes))
        ids = np.sort(np.argpartition(-sizes, count - 1)[:count])
        return cls(ids, np.asarray(coordinates(ids), np.float32))


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """faiss's C++ code prints what it does with on-disk lists to the process's stdout, which would
    mix into `msif query --json`: file descriptor 1 goes to /dev/null inside the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class CodeScan:
    """Every document's coarse coordinates times one ranking's per-document weights, as product-
    quantised codes scanned whole (faiss ``IndexPQFastScan``, inner product): 4 bits a coordinate,
    128 bytes a document at 256 coordinates. The weights are folded into the codes, so a
    scan serves that ranking alone; ``digest`` (sha256 of the float32 weights) identifies it. Scores
    are approximate: the scan proposes candidates that full rows re-rank. Measured on 10^6 simulated
    documents (benchmarks/ivf_scale.py, docs/ivf_scale.md): the exact top 10 of the coordinates was
    among the scan's top 2,000 per sign for 1.00 (proponents) and 0.99 (opponents) of them, in 11 ms
    for both signs on one thread."""

    def __init__(self, index, digest: str, weights: np.ndarray | None = None):
        self.index, self.digest = index, digest
        self.weights = weights  # while building: what add() folds in

    @staticmethod
    def weights_digest(weights: np.ndarray) -> str:
        import hashlib

        return hashlib.sha256(np.ascontiguousarray(weights, np.float32).tobytes()).hexdigest()

    @staticmethod
    def subquantizers(dims: int) -> int:
        """One 4-bit code a coordinate: a code a pair of coordinates (half the bytes, half the time)
        found 0.92 / 0.79 of the top 10 (proponents / opponents) at 10^7 documents, one a coordinate
        1.00 / 0.99 at 10^6."""
        return dims

    @classmethod
    def train(cls, sample: np.ndarray, weights: np.ndarray, seed: int = 0) -> CodeScan:
        """Codebooks trained on ``sample`` (n, P) of already weighted coordinates, no documents yet;
        ``weights`` (documents,) are the ranking's, which :meth:`add` folds into every block."""
        import faiss

        dims = sample.shape[1]
        index = faiss.IndexPQFastScan(dims, cls.subquantizers(dims), 4, faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.seed = seed
        index.train(np.ascontiguousarray(sample, np.float32))
        return cls(index, "", np.asarray(weights, np.float32))  # the digest: on saving, once the weights are final

    def add(self, start: int, rows: np.ndarray) -> None:
        """Encode documents ``start, start + 1, ...`` (their coordinates); blocks come in id order from 0."""
        if start != self.index.ntotal:
            raise ValueError(f"document blocks must come in order: expected id {self.index.ntotal}, got {start}")
        self.index.add(np.ascontiguousarray(rows * self.weights[start:start + len(rows), None], np.float32))

    def save(self, path: str | os.PathLike) -> None:
        """Written atomically, once every document is encoded."""
        import faiss

        from .storage import atomic_path

        if self.weights is None or self.index.ntotal != len(self.weights):
            weighed = 0 if self.weights is None else len(self.weights)  # an array has no truth value
            raise ValueError(f"{self.index.ntotal} documents encoded for {weighed} weights")
        self.digest = self.weights_digest(self.weights)
        with atomic_path(path) as tmp:
            faiss.write_index(self.index, str(tmp))

    @classmethod
    def load(cls, path: str | os.PathLike, digest: str) -> CodeScan:
        import faiss

        return cls(faiss.read_index(str(path)), digest)

    def search(self, coarse: np.ndarray, offset: np.ndarray, k: int, weights: np.ndarray | None = None,
               band: Band | None = None, list_sizes: np.ndarray | None = None) -> Retrieval:
        """Top-k of both signs of the weighted coordinates' approximate scores (``IVFLists.search``'s
        signature: the weights are the codes', every document is scanned, so no band is needed). The
        coarse basis must be uncentred (no offset): a weight cannot be folded into a shared offset."""
        if np.any(np.asarray(offset) != 0):
            raise ValueError("a code scan needs an uncentred coarse basis (offset 0)")
        q = np.ascontiguousarray(coarse, np.float32)
        k = min(int(k), int(self.index.ntotal))
        high, high_ids = self.index.search(q, k)
        low, low_ids = self.index.search(-q, k)
        return Retrieval(high_ids.astype(np.int64), high, low_ids.astype(np.int64), -low)


class IVFLists:
    """Documents' coarse coordinates (``PCABasis.transform``) in a faiss inverted file whose lists are on disk and
    memory-mapped: ``directory`` holds ``index.faiss`` (the trained quantizer and the lists' layout)
    and ``lists.ivfdata`` (the rows, list by list). A search visits ``nprobe`` lists per sign."""

    INDEX, DATA = "index.faiss", "lists.ivfdata"

    def __init__(self, index, nprobe: int):
        import faiss

        self.index = index
        self.ivf = faiss.extract_index_ivf(index)
        self.nprobe = min(int(nprobe), self.ivf.nlist)
        self.centroids = self.ivf.quantizer.reconstruct_n(0, self.ivf.nlist)  # unit rows (nlist, P)

    @property
    def nlist(self) -> int:
        return int(self.ivf.nlist)

    @classmethod
    def build(cls, directory: str | os.PathLike, sample: np.ndarray, blocks: Iterable[tuple[int, np.ndarray]],
              nlist: int, nprobe: int, seed: int = 0, directions: int | None = None) -> IVFLists:
        """Train the lists' centroids on ``sample`` (n, P) and fill them from ``blocks`` of (first id,
        rows): each block goes through a temporary index file, merged into one memory-mappable lists
        file (faiss.contrib.ondisk), so no more than a block is ever in memory.

        ``directions``: only the first this many coordinates place a row in a list (the centroids are
        zero past them); the rows are stored whole and scored whole. A basis's residual sketch
        (``PCABasis.sketch_dims``) carries most of a document's energy and is noise to a query inside the
        basis: lists clustered on it were visited by that noise (202,200 documents, a third of the
        lists visited: the records' recall@10 of the raw ranking fell from 0.956 to 0.769)."""
        import faiss
        from faiss.contrib.ondisk import merge_ondisk

        from .storage import atomic_dir

        sample = unit_rows(sample)  # a copy: the caller's coordinates stay whole
        if directions is not None:
            sample[:, directions:] = 0.0
            sample /= np.maximum(np.linalg.norm(sample, axis=1, keepdims=True), np.float32(1e-30))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(sample.shape[1]), sample.shape[1], int(nlist),
                                   faiss.METRIC_INNER_PRODUCT)
        # Spherical k-means on unit coordinates: lists by direction. Inner-product k-means on raw rows
        # lets heavy documents pull every centroid (measured: the largest list held 42% of a 32k
        # haystack, a quarter of the lists were empty). Rows are added by inner product with the unit
        # centroids, i.e. by cosine.
        index.cp.seed, index.cp.spherical = seed, True
        index.train(sample)
        with atomic_dir(directory) as tmp, _quiet_stdout():
            parts = []
            for i, (start, rows) in enumerate(blocks):
                part = faiss.clone_index(index)
                part.add_with_ids(np.ascontiguousarray(rows, np.float32), np.arange(start, start + len(rows)))
                parts.append(str(Path(tmp) / f"part-{i:05d}.faiss"))
                faiss.write_index(part, parts[-1])
            merge_ondisk(index, parts, str(Path(tmp) / cls.DATA))
            faiss.write_index(index, str(Path(tmp) / cls.INDEX))
            for part in parts:
                os.unlink(part)
        return cls.load(directory, nprobe)

    @classmethod
    def load(cls, directory: str | os.PathLike, nprobe: int) -> IVFLists:
        """The lists memory-mapped from ``directory`` (found there whatever the directory's name now)."""
        import faiss

        with _quiet_stdout():
            index = faiss.read_index(str(Path(directory) / cls.INDEX), faiss.IO_FLAG_ONDISK_SAME_DIR)
        return cls(index, nprobe)

    def _scored(self, lists: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, <q, row>) of the documents in ``lists``, each list's rows multiplied where they lie in
        the memory-mapped lists file: gathering them first copied every visited row (297 MiB a query
        for a 32k corpus at 2,304 coordinates), and a product that large started numpy's BLAS threads,
        which fight torch's for the cores."""
        import faiss

        invlists, width = self.ivf.invlists, self.ivf.d
        ids, scores = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
        for j in np.unique(lists[lists >= 0]):
            size = invlists.list_size(int(j))
            if size:
                ids.append(faiss.rev_swig_ptr(invlists.get_ids(int(j)), size).copy())
                codes = faiss.rev_swig_ptr(invlists.get_codes(int(j)), size * self.ivf.code_size)
                scores.append(np.frombuffer(codes, np.float32).reshape(size, width) @ q)
        return np.concatenate(ids), np.concatenate(scores)

    def list_sizes(self, sizes: np.ndarray) -> np.ndarray:
        """Per list, the largest of its documents' ``sizes`` (weight x row norm of a ranking): what a
        list's best score can reach along its centroid (reads every list's ids once)."""
        import faiss

        out = np.zeros(self.nlist, np.float32)
        for j in range(self.nlist):
            size = self.ivf.invlists.list_size(j)
            if size:
                out[j] = sizes[faiss.rev_swig_ptr(self.ivf.invlists.get_ids(j), size)].max()
        return out

    def search(self, coarse: np.ndarray, offset: np.ndarray, k: int, weights: np.ndarray | None = None,
               band: Band | None = None, list_sizes: np.ndarray | None = None) -> Retrieval:
        """Top-k of both signs of ``(rows @ q + offset) * weight`` over the visited lists: the
        ``nprobe`` best lists for q (proponents) and for -q (opponents), per query, more when they
        hold fewer than k documents; and the ``band``'s documents, whatever their lists.

        Lists are ranked by their centroid's inner product with q, times their ``list_sizes`` where
        given (``list_sizes``): a ranking by weighted inner products is led by documents of large
        weight x norm, which the nearest directions alone miss. Measured on 10^6 simulated documents
        (benchmarks/ivf_scale.py), visiting 6.5% of them per sign, the raw ranking's top 10 was found
        at 0.95 against 0.62 by direction alone; a normalised ranking's, at 0.70 either way."""
        sides = []
        for q, shift in zip(np.ascontiguousarray(coarse, np.float32), offset):
            ids, scores = self._visit(q, k, list_sizes)
            if band is not None and len(band.ids):
                fresh = ~np.isin(band.ids, ids)
                ids = np.concatenate([ids, band.ids[fresh]])
                scores = np.concatenate([scores, band.coordinates[fresh] @ q])
            scores = scores + shift
            if weights is not None:
                scores = scores * weights[ids]
            high_ids, high = _sorted(*_keep(ids[None], scores[None].astype(np.float32), k))
            low_ids, neg = _sorted(*_keep(ids[None], -scores[None].astype(np.float32), k))
            sides.append((high_ids[0], high[0], low_ids[0], -neg[0]))
        return Retrieval(*(np.stack([side[i] for side in sides]) for i in range(4)))

    def _visit(self, q: np.ndarray, k: int, list_sizes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, <q, row>) of the documents in the lists visited for q and for -q."""
        along = self.centroids @ q
        high, low = (np.argsort(-_priority(c, list_sizes), kind="stable") for c in (along, -along))
        probes = self.nprobe
        while True:
            ids, scores = self._scored(np.concatenate([high[:probes], low[:probes]]), q)
            if len(ids) >= k or probes >= self.nlist:
                return ids, scores
            probes = min(self.nlist, 2 * probes)


def rerank_block(dim: int) -> int:
    """Rows of ``dim`` numbers re-ranked at once (``RERANK_BLOCK_BYTES`` of float32)."""
    return max(1, RERANK_BLOCK_BYTES // (4 * dim))


def _priority(along: np.ndarray, list_sizes: np.ndarray | None) -> np.ndarray:
    """Lists pointing along the query first, scaled by how large their documents are."""
    return along if list_sizes is None else np.where(along > 0, along * list_sizes, along)


def staged_search(lists: IVFLists, basis: PCABasis, full_rows: Callable[[np.ndarray], np.ndarray], queries,
                  k: int, rerank: int, weights: np.ndarray | None = None, clock: dict | None = None,
                  band: Band | None = None, list_sizes: np.ndarray | None = None) -> Retrieval:
    """Coarse stage over the inverted ``lists`` of coarse coordinates (and the ``band``) for
    ``rerank`` candidates per sign, then their full rows (``full_rows(sorted ids) -> (n, D) float32``)
    re-scored and the best ``k`` per sign kept. ``clock`` receives the seconds of each step
    (``coarse_s``, ``rerank_s``)."""
    started = time.perf_counter()
    q = _queries(queries)
    coarse_q, offset = basis.queries(q)
    coarse = lists.search(coarse_q, offset, max(k, rerank), weights, band, list_sizes)
    ids = coarse.candidate_ids()
    middle = time.perf_counter()
    exact = np.empty((len(ids), len(q)), np.float32)  # (n, Q), in blocks: many queries' rows stay bounded
    block = rerank_block(q.shape[1])
    for start in range(0, len(ids), block):
        exact[start:start + block] = products(full_rows(ids[start:start + block]), q)
    if weights is not None:
        exact *= weights[ids, None]
    rows = np.arange(len(q))[:, None]

    def best(side_ids: np.ndarray, sign: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query's own candidates re-ranked by their full scores, the best k kept."""
        scores = exact[np.searchsorted(ids, side_ids), rows]  # (Q, m)
        order = np.lexsort((side_ids, -sign * scores), axis=1)[:, :k]
        return np.take_along_axis(side_ids, order, 1), np.take_along_axis(scores, order, 1).astype(np.float32)

    found = Retrieval(*best(coarse.proponent_ids, 1), *best(coarse.opponent_ids, -1))
    if clock is not None:
        clock.update(coarse_s=middle - started, rerank_s=time.perf_counter() - middle)
    return found

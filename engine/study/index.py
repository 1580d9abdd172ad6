"""The study's search index (the index stage's files and their reader).

Two kinds of document vectors are searched (``engine.study.vectors``): ``projected`` (unit-scale
projected raw gradients: gradient-cosine; times the exact norms: gradient-dot and
pt-inverse-dropped) and ``whitened`` (multi-stage). Each is served in one of two ways, chosen by
corpus size:

    flat  an exhaustive scan of the memory-mapped shards (exact; small studies)
    ivf   a staged search (``engine.search.staged_search``): every document's ``index_dims``
          coordinates in a basis fit on query vectors (the principal directions of preconditioned
          fine-tuning records) and a count sketch of what it leaves out (``sketch``), in a faiss
          inverted file on disk and memory-mapped
          (``engine.search.IVFLists``, trained on a sample of the documents' principal coordinates); a query
          visits ``nprobe`` of its ``nlist`` lists per sign (about ``visit`` documents' coordinates
          read per sign, whatever the corpus size; lists ranked by their centroid's alignment with
          the query times their largest weight x row norm), plus the ``band`` documents with the
          largest weight times row norm for the ranking at hand, and the best ``rerank`` per sign are
          re-scored with their full rows read from the shards. The default ranking (multi-stage,
          ``engine.methods.DEFAULT_NORMALIZATION``) also gets a code scan (``engine.search.CodeScan``:
          the coordinates times its weights, 4 bits a coordinate, every document scanned), which serves it in
          place of the lists wherever a query would visit only a share of them: a normalised ranking's
          best documents lie in many lists

Cosine and dot scores share one set of files: the norms are stored, not a second index. The index
stage also stores every document's whitened norm (normalised rankings) and, for ivf, the projected
rows' norms (the band). The build reads one shard at a time; the kind, its settings and the recall
measured against a full scan (of the dot and the cosine ranking) are recorded with the index stage in
the manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import numpy as np

from ..methods import MULTI_STAGE, method
from ..normalization import DEFAULT, search_weights
from ..retrieval import Retrieval
from ..search import Band, CodeScan, IVFLists, PCABasis, rerank_block, scan, staged_search, unit_rows
from ..storage import save_npy
from . import layout
from .manifest import Study, StudyError
from .vectors import DocumentVectors

VECTOR_KINDS = ("whitened",)  # the kinds an ivf index is built for; other stored kinds are scanned
INDEX_KINDS = ("auto", "flat", "ivf")
HOLD_BYTES = 2**30  # a scanned kind's float32 rows up to this size are held in memory after first use
FLAT_LIMIT = 20_000  # documents: up to here an exhaustive scan of the shards is fast enough (auto)
FIT = "query basis, spherical k-means"  # how an ivf index's basis and lists are fit (older ones: rebuild)
SCAN_MIN_SAMPLE = 16 * 39  # sampled documents the code scan's codebooks (16 codes each) need; fewer: no scan
KEPT_SAMPLE = 4096  # documents whose energy in the coarse basis the index record reports
# The residual sketch when a study names none: SKETCH coordinates up to SKETCH_LIMIT documents (it was measured up
# to 202,200), none above, where the principal coordinates alone were measured (10^6-10^7, docs/ivf_scale.md) and
# a sketch's lists and codes (4 and 0.5 bytes a coordinate a document) would grow past 2 GiB and 0.3 GiB
SKETCH, SKETCH_LIMIT = 2048, 250_000


@dataclass(frozen=True)
class IndexSettings:
    kind: str = "auto"  # auto | flat | ivf ("pca", the name of the earlier staged index, is read as ivf)
    dims: int = 256  # principal coordinates in the coarse stage (ivf)
    # Candidates per sign re-scored with full vectors (ivf). With the residual sketch, 2,000 serve MRR@10 0.863
    # pooled over five 32k seeds (4,000: 0.867) and 0.900 among 202,200 documents (4,000: the same), and a trace
    # at 32k takes 1.35 s instead of 1.64 s (docs/normalization.md)
    rerank: int = 2000
    sample: int = 16_384  # documents the basis is fit on; the centroids get more when there are many lists
    seed: int = 0
    nlist: int = 0  # inverted lists (ivf); 0: about 4 sqrt(documents), at least 39 sampled documents a list
    nprobe: int = 0  # lists a query visits per sign (ivf); 0: as many as hold about ``visit`` documents
    # Documents a query's coarse stage reads per sign (ivf). A normalised ranking wants a large share:
    # on a 32k haystack (405 lists) the served gradient ranking's MRR@10 was 0.665 at 64 lists a sign,
    # 0.794 at 128, 0.837 at 200 and at all 405; 65,536 reads all of a 32k corpus and a fixed 64 MiB of
    # coordinates a sign at any size (benchmarks/ivf_scale.py measures recall and time at 10^5-10^7).
    visit: int = 65_536
    band: int = 2000  # documents of largest weight x row norm always scored in the coarse stage (ivf)
    queries: int = 512  # fine-tuning records whose query vectors the coarse basis is fit on (ivf)
    # Coarse coordinates of a count sketch of the basis's residual (ivf; 0: none; None: ``sketch_size``). The
    # principal ones keep 15% of a held-out fact query's energy; with a 2,048-coordinate sketch the served MRR@10
    # at 32k rose from 0.829 to 0.897 (seed 4) and 0.788 to 0.829 (seed 1), where a full scan of the rows serves
    # 0.896 and 0.825 (docs/normalization.md). It costs 4 bytes a coordinate in the lists, half a byte in the scan.
    sketch: int | None = None

    def __post_init__(self):
        if self.kind == "pca":
            object.__setattr__(self, "kind", "ivf")
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index must be one of {', '.join(INDEX_KINDS)}, got {self.kind!r}")
        if (min(self.dims, self.rerank, self.sample, self.visit, self.queries) < 1
                or min(self.nlist, self.nprobe, self.band, self.sketch or 0) < 0):
            raise ValueError("index_dims, rerank, index_sample, index_queries and visit must be >= 1 "
                             "(nlist, nprobe, band, index_sketch >= 0)")

    def resolved(self, documents: int) -> str:
        if self.kind != "auto":
            return self.kind
        return "ivf" if documents > FLAT_LIMIT else "flat"

    def sketch_size(self, documents: int) -> int:
        """Sketch coordinates of the coarse stage: the study's, or SKETCH up to SKETCH_LIMIT documents, none above."""
        if self.sketch is not None:
            return self.sketch
        return SKETCH if documents <= SKETCH_LIMIT else 0

    def wanted_lists(self, documents: int) -> int:
        return max(1, self.nlist or int(round(4 * np.sqrt(documents))))

    def basis_sample(self, queries: int, dim: int) -> int:
        """Full rows held while the coarse basis is fit: documents fill only the dimensions the
        ``queries`` leave; where they span the basis, ``KEPT_SAMPLE`` rows measure what it keeps
        (16,384 rows of 65,536 numbers took 9 GiB to hold)."""
        return KEPT_SAMPLE if queries >= min(self.dims, dim) else self.sample

    def training_documents(self, documents: int) -> int:
        """Documents whose coordinates train the lists' centroids: ``sample``, or 39 a list (faiss's
        minimum) where about 4 sqrt(N) lists need more; at most the corpus."""
        return min(documents, max(self.sample, 39 * self.wanted_lists(documents)))

    def lists(self, documents: int, sampled: int) -> int:
        """The number of inverted lists for a corpus: ``nlist``, or about 4 sqrt(N), each centroid
        trained on at least 39 of the ``sampled`` documents."""
        return max(1, min(self.wanted_lists(documents), sampled // 39))

    def probes(self, documents: int, nlist: int) -> int:
        """Lists visited per sign: ``nprobe``, or as many as hold about ``visit`` documents."""
        wanted = self.nprobe or int(np.ceil(self.visit * nlist / max(documents, 1)))
        return max(1, min(nlist, wanted))


def build_index(study: Study, settings: IndexSettings, queries: dict[str, np.ndarray] | None = None,
                probes: dict[str, np.ndarray] | None = None, progress: bool = False) -> tuple[list[str], dict]:
    """Write the index files (none for ``flat``); returns them and the record for the manifest.

    ``queries``: query vectors (n, D) per vector kind that an ivf index fits its coarse basis on (a
    flat index needs none). ``probes``: other query vectors per kind, to measure recall of the served
    search against an exhaustive scan (recorded; the index works without them).
    """
    vectors = DocumentVectors.of(study)
    kind = settings.resolved(vectors.documents)
    record = {**asdict(settings), "configured": settings.kind, "kind": kind, "documents": vectors.documents,
              "whitened_norms": layout.INDEX_NORMS.path}
    whitened_norms = _save_row_norms(study, vectors)
    files = [layout.INDEX_NORMS.path]
    if kind == "ivf":
        missing = [name for name in VECTOR_KINDS if queries is None or len(queries.get(name, ())) == 0]
        if missing:
            raise ValueError(f"an ivf index fits its basis on query vectors; none given for {', '.join(missing)}")
        for name in VECTOR_KINDS:
            record[name] = _build_ivf(study, vectors, name, queries[name], settings, whitened_norms, progress)
            files += [layout.index_file(name, "basis"), *study.files_under(layout.index_file(name, "ivf"))]
            files += [layout.index_file(name, "scan")] if record[name]["scan"] else []
    if probes and kind == "ivf":  # a flat index is the scan itself
        index = StudyIndex(study, record)
        record["recall"] = {name: index.measure(name, q) for name, q in probes.items()}
    return files, record


def _save_row_norms(study: Study, vectors: DocumentVectors) -> np.ndarray:
    """Every document's whitened row norm, a shard at a time (4 bytes a document)."""
    norms = np.empty(vectors.documents, np.float32)
    for start, rows in vectors.numbered_chunks("whitened"):
        norms[start:start + len(rows)] = np.sqrt(np.square(rows, dtype=np.float64).sum(1))
    save_npy(study.path(layout.INDEX_NORMS), norms)
    return norms


def sample_shards(vectors: DocumentVectors, size: int) -> list[int]:
    """Whole shards spread evenly over the corpus holding about ``size`` documents (sequential reads)."""
    wanted = max(1, -(-size // vectors.shard_size))
    return np.unique(np.linspace(0, vectors.shards - 1, min(wanted, vectors.shards)).round().astype(int)).tolist()


def document_sample(vectors: DocumentVectors, name: str, size: int) -> np.ndarray:
    """About ``size`` full rows of one vector kind, from whole shards spread over the corpus."""
    return np.concatenate([rows for _, rows in vectors.numbered_chunks(name, sample_shards(vectors, size))])


def _build_ivf(study: Study, vectors: DocumentVectors, name: str, queries: np.ndarray, settings: IndexSettings,
               whitened_norms: np.ndarray, progress: bool) -> dict:
    """Fit the coarse basis on the query vectors (``PCABasis.fit_queries``: the coarse score
    <V^T q, V^T w> misses only the part of q outside the basis; the documents of whole, evenly spread
    shards fill the dimensions the queries leave), train the inverted lists' centroids on the
    coordinates of a sample that grows with the list count (transformed a shard at a time: full rows
    of a large model are too big to hold), then fill the lists a shard at a time."""
    from tqdm.auto import tqdm

    sample = document_sample(vectors, name, settings.basis_sample(len(queries), vectors.dim(name)))
    basis = PCABasis.fit_queries(queries, sample, settings.dims, settings.seed).with_sketch(
        settings.sketch_size(vectors.documents), settings.seed)
    every = slice(None, None, max(1, len(sample) // KEPT_SAMPLE))
    documents_kept = float(np.square(sample[every] @ basis.components, dtype=np.float64).sum()
                           / np.square(sample[every], dtype=np.float64).sum())
    del sample
    queries_kept = float(np.square(unit_rows(queries) @ basis.components, dtype=np.float64).sum(1).mean())
    basis.save(study.path(layout.index_file(name, "basis")))
    picked = sample_shards(vectors, settings.training_documents(vectors.documents))
    sampled = [(start, basis.transform(rows)) for start, rows in vectors.numbered_chunks(name, picked)]
    coordinates = np.concatenate([rows for _, rows in sampled])
    weights = search_weights(method(MULTI_STAGE), DEFAULT, name, np.sqrt(vectors.sq_norms()).astype(np.float32),
                             whitened_norms)
    code_scan = None
    if weights is not None and len(coordinates) >= SCAN_MIN_SAMPLE:
        weighted = [rows * weights[start:start + len(rows), None] for start, rows in sampled]
        code_scan = CodeScan.train(np.concatenate(weighted), weights, settings.seed)
    del sampled
    nlist = settings.lists(vectors.documents, len(coordinates))
    shards = tqdm(vectors.numbered_chunks(name), total=vectors.shards, disable=not progress,
                  desc=f"index ({name})", unit="shard")

    def blocks():  # one pass over the shards fills the lists and the scan
        for start, rows in shards:
            coarse = basis.transform(rows)
            if code_scan is not None:
                code_scan.add(start, coarse)
            yield start, coarse

    lists = IVFLists.build(study.path(layout.index_file(name, "ivf")), coordinates, blocks(), nlist,
                           settings.probes(vectors.documents, nlist), settings.seed,
                           directions=basis.principal_dims)
    record = {"dims": basis.dims, "sketch": basis.sketch_dims, "lists_by": "principal coordinates",
              "sampled_documents": int(len(coordinates)),
              "queries": int(len(queries)), "query_energy_kept": queries_kept, "document_energy_kept": documents_kept,
              "nlist": lists.nlist, "nprobe": lists.nprobe, "fit": FIT, "scan": None}
    if code_scan is not None:
        code_scan.save(study.path(layout.index_file(name, "scan")))
        record["scan"] = {"ranking": str(DEFAULT), "weights_sha256": code_scan.digest,
                          "bytes_per_document": CodeScan.subquantizers(basis.dims) // 2}
    return record


class VectorSearch:
    """Top-k of one vector kind for query vectors (Q, D), both signs: a scan or the staged search."""

    RANKINGS_KEPT = 8  # rankings whose band (coordinates of ``band`` documents) and list sizes are kept

    def __init__(self, vectors: DocumentVectors, name: str, kind: str, rerank: int,
                 lists: IVFLists | None = None, basis: PCABasis | None = None,
                 row_norms: np.ndarray | None = None, band: int = 0, code_scan: CodeScan | None = None):
        self.vectors, self.name, self.kind, self.rerank = vectors, name, kind, rerank
        self.lists, self.basis, self.row_norms, self.band_size = lists, basis, row_norms, band
        self.code_scan = code_scan
        self._held: np.ndarray | None = None
        self._rankings: list[tuple[np.ndarray | None, Band | None, np.ndarray]] = []
        self._scanned: list[tuple[np.ndarray | None, bool]] = []  # weights seen; whether the scan serves them

    @property
    def dim(self) -> int:
        return self.vectors.dim(self.name)

    def search(self, queries, k: int, weights: np.ndarray | None = None, clock: dict | None = None) -> Retrieval:
        """``clock`` receives the seconds of the steps of a staged search."""
        k = min(int(k), self.vectors.documents)
        if self.kind == "flat":
            return self.scan(queries, k, weights)
        if self.scans(weights):
            return staged_search(self.code_scan, self.basis, partial(self.vectors.gather, self.name), queries, k,
                                 self.rerank, weights, clock)
        band, list_sizes = self.ranking(weights)
        return staged_search(self.lists, self.basis, partial(self.vectors.gather, self.name), queries, k,
                             self.rerank, weights, clock, band, list_sizes)

    def scans(self, weights: np.ndarray | None) -> bool:
        """Whether the code scan serves this ranking: its weights are the ones folded into the codes
        (checked by digest once per weights array; the caller keeps one array per ranking), and a query
        would not visit every list (where it would, the lists' exact coordinates beat the codes at the
        same cost: a 32k corpus at the default ``visit``)."""
        if self.code_scan is None or weights is None or self.lists.nprobe >= self.lists.nlist:
            return False
        for kept, serves in self._scanned:
            if kept is weights:
                return serves
        serves = CodeScan.weights_digest(weights) == self.code_scan.digest
        self._scanned = [(weights, serves), *self._scanned[:self.RANKINGS_KEPT - 1]]
        return serves

    def ranking(self, weights: np.ndarray | None) -> tuple[Band | None, np.ndarray]:
        """What the coarse stage needs for one ranking, computed once: the ``band`` documents of
        largest |weight| x row norm with their coarse coordinates (read from the shards), and each
        list's largest |weight| x row norm (``IVFLists.list_sizes``). The caller keeps one weights
        array per ranking, and the ranking is found by that array's identity."""
        for kept, band, list_sizes in self._rankings:
            if kept is weights:
                return band, list_sizes
        size = self.row_norms if weights is None else self.row_norms * np.abs(weights)
        band = None if not self.band_size else Band.heaviest(size, self.band_size, self._coordinates)
        list_sizes = self.lists.list_sizes(size)
        self._rankings = [(weights, band, list_sizes), *self._rankings[:self.RANKINGS_KEPT - 1]]
        return band, list_sizes

    def _coordinates(self, ids: np.ndarray) -> np.ndarray:
        """Coarse coordinates of sorted documents ``ids``, their full rows decoded a cache-sized
        block at a time (a band of 2,000 rows of 65,536 numbers would be 512 MiB at once)."""
        block = rerank_block(self.dim)
        return np.concatenate([self.basis.transform(self.vectors.gather(self.name, ids[s:s + block]))
                               for s in range(0, len(ids), block)])

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
        old = (record["kind"] not in INDEX_KINDS or "whitened_norms" not in record
               or (record["kind"] == "ivf" and any(record[n].get("fit") != FIT for n in VECTOR_KINDS)))
        if old:
            raise StudyError(f"the index of {study.root} was built by an older msif (no whitened norms, a "
                             f"{record['kind']} index, or a coarse basis fit on documents rather than queries); run "
                             f"`{study.rebuild_command()}` to rebuild it (it reruns the index stage only)")
        self.study, self.record = study, record
        self.vectors = DocumentVectors.of(study)
        self._norms: np.ndarray | None = None
        self.whitened_norms: np.ndarray = np.load(study.path(record["whitened_norms"]))
        self.searches = {name: self._search(name) for name in VECTOR_KINDS}

    def _search(self, name: str) -> VectorSearch:
        if self.kind != "ivf":
            return VectorSearch(self.vectors, name, self.kind, self.record["rerank"])
        lists = IVFLists.load(self.study.path(layout.index_file(name, "ivf")), self.record[name]["nprobe"])
        basis = PCABasis.load(self.study.path(layout.index_file(name, "basis")))
        scanned = self.record[name].get("scan")  # older indexes have none: their lists serve every ranking
        code_scan = None if not scanned else CodeScan.load(self.study.path(layout.index_file(name, "scan")),
                                                           scanned["weights_sha256"])
        return VectorSearch(self.vectors, name, self.kind, self.record["rerank"], lists, basis,
                            self.whitened_norms, self.record["band"], code_scan)

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
        """Top-k of ``<q, row> * weight`` per document: e.g. dividing weights give normalised rankings.
        A stored kind that is not indexed (the Kronecker projection of older studies, an ablation) is
        scanned."""
        if name not in self.searches:
            if name not in self.vectors.kinds():
                raise ValueError(f"{self.study.root} stores no {name} vectors")
            self.searches[name] = VectorSearch(self.vectors, name, "flat", self.record["rerank"])
        return self.searches[name].search(queries, k, weights, clock)

    def measure(self, name: str, queries, ks: tuple[int, ...] = (10, 100)) -> dict:
        """Recall@k of the served proponents against an exhaustive scan, averaged over queries, for the
        dot ranking of the stored rows (``at_k``) and their cosine ranking (``cosine_at_k``)."""
        out = {"queries": int(len(np.atleast_2d(queries)))}
        unit = (1 / np.maximum(self.searches[name].row_norms, 1e-30)).astype(np.float32)
        for label, weights in (("", None), ("cosine_", unit)):
            served = self.search(name, queries, max(ks), weights)
            truth = self.searches[name].scan(queries, max(ks), weights)
            for k in ks:
                hits = [len(set(a[:k].tolist()) & set(b[:k].tolist())) / min(k, len(b))
                        for a, b in zip(served.proponent_ids, truth.proponent_ids)]
                out[f"{label}at_{k}"] = float(np.mean(hits))
        return out

"""The staged search's coarse stage at 10^5 to 10^7 documents, simulated from a real haystack study.

From a haystack study (``msif build-demo --extra-documents N``), the whitened vectors' principal
basis is fit as the index stage fits it, and every document's 256 principal coordinates are kept
with its norms. N synthetic documents are then drawn: a real document's coordinates plus Gaussian
noise (``--noise`` times each coordinate's spread), its gradient and whitened norms drawn with it, so
the corpus keeps the real one's clusters and norm tails (a synthetic document's norms are its source's
scaled with its coordinates' norm). The queries are the study's own: its pretraining-only facts'
answers, traced at theta_ft and whitened (multi-stage). For each size the faiss inverted lists are
built as the index stage builds them (``engine.search.IVFLists``: lists on disk, about 4 sqrt(N) of
them, trained on 39 documents a list) and searched as the study serves them, for a raw ranking and the
default normalised one, visiting as many lists per sign as hold ``--visits`` documents (ranked by
direction times their largest weight x norm), with the band
of the ``band`` documents of largest weight times whitened norm always scored. The exhaustive
reference and the band are gathered while the corpus is drawn, so only the lists are stored:

    build s, disk     the lists' construction and their files
    search p50, p95   the coarse stage per query (the visited lists per sign, weighted scoring)
    RSS               the process's resident memory while serving (the lists are memory-mapped)
    recall            of the exhaustive scan's top 10 (over the same synthetic coordinates, with the same
                      weights): the share found among the ``rerank`` candidates the coarse stage hands
                      to the full-row re-rank, and the share in its own top 10

The re-rank (2 x ``rerank`` full rows read by pread) and the exact re-scoring cost the same whatever
N; they are measured on the real study and added for an end-to-end estimate.

    python benchmarks/ivf_scale.py --study studies/bench/seed-2-h30k --sizes 100000 1000000 10000000
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from engine.methods import DEFAULT_NORMALIZATION, MULTI_STAGE
from engine.normalization import Normalization
from engine.query import QueryEngine
from engine.search import Band, CodeScan, IVFLists, PCABasis, TopK
from engine.study import IndexSettings, open_study
from engine.study.index import document_sample
from engine.study.vectors import DocumentVectors

BLOCK = 65_536  # synthetic documents drawn and added at a time
PATHS = ("lists", "scan")  # the coarse stages measured: the inverted lists, the default ranking's code scan


def real_statistics(study, records: int) -> tuple[PCABasis, np.ndarray, dict[str, np.ndarray]]:
    """The coarse basis fit as the index stage fits it (``PCABasis.fit_queries`` on ``records``
    fine-tuning records' multi-stage query vectors, prompts in the study's template), every document's
    coordinates (N, P) and its norms."""
    vectors = DocumentVectors.of(study.directory)
    rows = study.records.select(np.linspace(0, len(study.records) - 1, min(records, len(study.records)))
                                .round().astype(int).tolist())
    q = QueryEngine(study).preconditioned([study.prompts.prompt(i) for i in rows["instruction"]],
                                          list(rows["response"]), MULTI_STAGE)
    settings = IndexSettings()
    basis = PCABasis.fit_queries(study.whitening.query_vectors(q.vectors).cpu().numpy(),
                                 document_sample(vectors, "whitened", settings.sample), settings.dims)
    coordinates = np.concatenate([basis.transform(rows) for _, rows in vectors.numbered_chunks("whitened")])
    return basis, coordinates, {"gradient": study.index.norms.astype(np.float64),
                                "whitened": study.index.whitened_norms.astype(np.float64)}


def queries(study, basis: PCABasis, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The study's pretraining-only facts traced through their reference answers, as coarse queries."""
    from engine.study import layout

    facts = [json.loads(line) for line in study.path(layout.FACTS).read_text().splitlines()]
    facts = [f for f in facts if f["split"] == "pretrain_only"][:count]
    engine = QueryEngine(study)
    q = engine.preconditioned([study.prompts.prompt(f["question"]) for f in facts], [f["response"] for f in facts],
                              MULTI_STAGE)
    return basis.queries(study.whitening.query_vectors(q.vectors).cpu().numpy().astype(np.float32))


def synthetic(coordinates: np.ndarray, norms: dict, n: int, noise: float, seed: int):
    """Blocks of (first id, coordinates, gradient norms, whitened norms) of n synthetic documents. A
    document's norms are its source's scaled by how much the noise changed its coordinates' norm, so
    that its weight in a normalised ranking still matches its row (with the source's norms kept
    as they were, noise decoupled the two and the normalised recall measured here was too low)."""
    rng = np.random.default_rng(seed)
    spread = coordinates.std(0).astype(np.float32)
    lengths = np.maximum(np.linalg.norm(coordinates, axis=1), 1e-30)
    for start in range(0, n, BLOCK):
        source = rng.integers(0, len(coordinates), min(BLOCK, n - start))
        rows = coordinates[source] + noise * spread * rng.standard_normal((len(source), coordinates.shape[1]),
                                                                          dtype=np.float32)
        scale = np.linalg.norm(rows, axis=1) / lengths[source]
        yield start, rows.astype(np.float32), norms["gradient"][source] * scale, norms["whitened"][source] * scale


class Reference:
    """What the exhaustive scan and the band of one ranking need, gathered while the corpus is drawn
    (so that 10^7 documents' coordinates are never stored): the scan's top 10 per query, and the
    ``band`` rows of largest weight x whitened norm. A floor (``@median``) and the zero guard are
    taken from the real study's norms."""

    def __init__(self, spec: str, real: dict, coarse: np.ndarray, offset: np.ndarray, band: int):
        self.spec, self.norm, self.real = spec, Normalization.parse(spec), real
        self.coarse, self.offset, self.band = coarse, offset, band
        self.top = TopK(len(coarse), 10)
        self.ids, self.sizes = np.zeros(0, np.int64), np.zeros(0)
        self.rows = np.zeros((0, coarse.shape[1]), np.float32)

    def weigh(self, gradient: np.ndarray, whitened: np.ndarray) -> np.ndarray | None:
        if self.norm.is_raw:
            return None
        key = "whitened" if self.norm.norm in ("whitened", "metric") else "gradient"
        return (1.0 / self.norm.divisors(whitened if key == "whitened" else gradient, self.real[key])
                ).astype(np.float32)

    def add(self, start: int, rows: np.ndarray, gradient: np.ndarray, whitened: np.ndarray) -> np.ndarray | None:
        weights = self.weigh(gradient, whitened)
        ids = np.arange(start, start + len(rows))
        scores = rows @ self.coarse.T + self.offset[None]
        self.top.add(scores if weights is None else scores * weights[:, None], ids)
        size = whitened if weights is None else whitened * np.abs(weights)
        ids, sizes = np.concatenate([self.ids, ids]), np.concatenate([self.sizes, size])
        kept = np.argsort(-sizes, kind="stable")[:self.band]
        self.rows = np.concatenate([self.rows, rows])[kept]
        self.ids, self.sizes = ids[kept], sizes[kept]
        return weights

    def band_rows(self) -> Band:
        order = np.argsort(self.ids)
        return Band(self.ids[order], self.rows[order])


def measure(workdir: Path, coordinates: np.ndarray, norms: dict, n: int, coarse: np.ndarray, offset: np.ndarray,
            noise: float, seed: int, rankings: list[str], rerank: int, visits: list[int],
            paths: tuple[str, ...] = PATHS) -> dict:
    settings = IndexSettings("ivf")
    drawn = list(synthetic(coordinates, norms, settings.training_documents(n), noise, seed + 1))
    sample = np.concatenate([rows for _, rows, _, _ in drawn])
    references = [Reference(spec, norms, coarse, offset, settings.band) for spec in rankings]
    weights = {spec: np.empty(n, np.float32) for spec in rankings if not Normalization.parse(spec).is_raw}
    default = next(r for r in references if r.spec == DEFAULT_NORMALIZATION)
    sample_weights = np.concatenate([default.weigh(g, w) for _, _, g, w in drawn])
    del drawn
    whitened = np.empty(n, np.float32)
    started = time.perf_counter()
    codes = CodeScan.train(sample * sample_weights[:, None], weights[DEFAULT_NORMALIZATION], seed) \
        if "scan" in paths else None  # weights: filled as the blocks are drawn
    scan_s = [time.perf_counter() - started]

    def blocks():  # one pass draws the corpus for the references, the lists and the scan
        for start, rows, g, w in synthetic(coordinates, norms, n, noise, seed):
            whitened[start:start + len(rows)] = w
            for reference in references:
                block = reference.add(start, rows, g, w)
                if block is not None:
                    weights[reference.spec][start:start + len(rows)] = block
            if codes is not None:
                t0 = time.perf_counter()
                codes.add(start, rows)
                scan_s[0] += time.perf_counter() - t0
            yield start, rows

    out = {"documents": n, "training": len(sample), "visits": {}}
    nlist = settings.lists(n, len(sample))
    built = workdir / "build.json"  # lists kept by an earlier run (--keep): only the references are redrawn
    if "lists" in paths and not built.exists():
        started, encoding = time.perf_counter(), scan_s[0]
        IVFLists.build(workdir / "ivf", sample, blocks(), nlist, settings.probes(n, nlist), seed)
        build_s = time.perf_counter() - started - (scan_s[0] - encoding)  # the lists' own time
        built.write_text(json.dumps({"build_s": build_s}))
    else:
        for _ in blocks():
            pass
    if codes is not None:
        started = time.perf_counter()
        codes.save(workdir / "scan.faiss")
        out["scan"] = search_scan(workdir / "scan.faiss", codes.digest, scan_s[0] + time.perf_counter() - started,
                                  default, coarse, offset, rerank)
        del codes
    if "lists" not in paths:
        return out
    build_s = json.loads(built.read_text())["build_s"]
    disk = sum(f.stat().st_size for f in (workdir / "ivf").iterdir())
    out.update(nlist=nlist, build_s=build_s, disk_bytes=disk)
    sizes = {}  # per ranking, each list's largest weight x norm (computed once, as VectorSearch.ranking does)
    for visit in visits:
        nprobe = IndexSettings("ivf", visit=visit).probes(n, nlist)
        lists = IVFLists.load(workdir / "ivf", nprobe)  # opened as a study opens it: memory-mapped
        row = out["visits"][visit] = {"nprobe": lists.nprobe}
        for reference in references:
            weight, band = weights.get(reference.spec), reference.band_rows()
            if reference.spec not in sizes:
                sizes[reference.spec] = lists.list_sizes(whitened if weight is None else whitened * np.abs(weight))
            seconds, found = [], []
            for i in range(len(coarse)):
                t0 = time.perf_counter()
                found.append(lists.search(coarse[i:i + 1], offset[i:i + 1], rerank, weight, band,
                                          sizes[reference.spec]))
                seconds.append(time.perf_counter() - t0)
            truth = reference.top.result()
            among = [len(set(t.tolist()) & set(f.proponent_ids[0].tolist())) / 10
                     for t, f in zip(truth.proponent_ids, found)]
            top = [len(set(t.tolist()) & set(f.proponent_ids[0, :10].tolist())) / 10
                   for t, f in zip(truth.proponent_ids, found)]
            row[reference.spec] = {"search_p50": statistics.median(seconds),
                                   "search_p95": float(np.percentile(seconds, 95)),
                                   "recall_among_candidates": float(np.mean(among)),
                                   "recall_top10": float(np.mean(top))}
        row["rss"] = _rss()
        del lists
    return out


def search_scan(path: Path, digest: str, build_s: float, reference: Reference, coarse: np.ndarray,
                offset: np.ndarray, rerank: int) -> dict:
    """The default ranking's code scan (``engine.search.CodeScan``, built as the index stage builds it:
    codebooks trained on the weighted sample, every document encoded in the one pass) read back and
    searched as a study serves it: both signs, ``rerank`` candidates each."""
    scan = CodeScan.load(path, digest)
    seconds, among, top = [], [], []
    truth = reference.top.result()
    for i in range(len(coarse)):
        t0 = time.perf_counter()
        found = scan.search(coarse[i:i + 1], offset[i:i + 1], rerank)
        seconds.append(time.perf_counter() - t0)
        among.append(len(set(truth.proponent_ids[i].tolist()) & set(found.proponent_ids[0].tolist())) / 10)
        top.append(len(set(truth.opponent_ids[i].tolist()) & set(found.opponent_ids[0].tolist())) / 10)
    return {"build_s": build_s, "disk_bytes": path.stat().st_size,
            "search_p50": statistics.median(seconds), "search_p95": float(np.percentile(seconds, 95)),
            "recall_among_candidates": float(np.mean(among)), "opponents_among_candidates": float(np.mean(top)),
            "rss": _rss()}


def _rss() -> dict[str, int]:
    """Resident memory now: the process's own (anonymous) and the memory-mapped files' pages."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("RssAnon", "RssFile")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, required=True, help="a haystack study (its index's vectors)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=24)
    parser.add_argument("--noise", type=float, default=0.3, help="noise per coordinate, times its spread")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--visits", type=int, nargs="+", default=[IndexSettings().visit],
                        help="documents read per sign by the coarse stage (the served default first)")
    parser.add_argument("--workdir", type=Path, help="where the synthetic lists go (default: a temporary directory)")
    parser.add_argument("--keep", type=Path, help="keep each size's lists here and reuse them in a later run "
                        "(the synthetic corpus is redrawn for the exhaustive reference; the build is not redone)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                        help="coarse stages to build and measure (the 10^7 lists take an hour to build)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    study = open_study(args.study, device="cpu")
    basis, coordinates, norms = real_statistics(study, IndexSettings().queries)
    coarse, offset = queries(study, basis, args.queries)
    rerank = study.config.influence.rerank
    rankings = list(dict.fromkeys(["none", DEFAULT_NORMALIZATION]))
    rows = []
    for n in args.sizes:
        if args.keep:
            workdir = args.keep / f"n{n}-seed{args.seed}-noise{args.noise:g}"
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(tempfile.mkdtemp(prefix="msif-ivf-", dir=args.workdir))
        try:
            rows.append(measure(workdir, coordinates, norms, n, coarse, offset, args.noise, args.seed, rankings,
                                rerank, args.visits, tuple(args.paths)))
        finally:
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
        print(rows[-1], flush=True)
    text = report(args, study, rows, rankings, rerank, len(coordinates))
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


def report(args, study, rows: list[dict], rankings: list[str], rerank: int, real: int) -> str:
    lines = [f"# The staged search at scale (simulated from `{args.study}`, {real:,} real documents)", "",
             f"`python benchmarks/ivf_scale.py {' '.join(map(str, args.argv))}`: synthetic documents = a real "
             f"document's 256 principal coordinates + noise ({args.noise:g} x each coordinate's spread), its norms "
             f"drawn with it; {args.queries} queries = the study's pretraining-only facts (reference answers, "
             "multi-stage, whitened). Coarse "
             f"stage only (faiss inverted lists on disk, memory-mapped; {rerank:,} candidates per sign handed to "
             f"the re-rank, the band of {IndexSettings().band:,} always among them); recall against an exhaustive "
             "scan of the same coordinates with the same weights."]
    if any(row["visits"] for row in rows):
        lines += ["", "| documents | lists | build s | disk GiB | documents read per sign (lists) | ranking | search "
                  "p50 s | p95 s | scan top-10 among candidates | top-10 overlap | serving RSS GiB (own + mapped) |",
                  "| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        for visit, served in row["visits"].items():
            for spec in rankings:
                r, rss = served[spec], served["rss"]
                lines.append(f"| {row['documents']:,} | {row['nlist']:,} | {row['build_s']:.0f} | "
                             f"{row['disk_bytes'] / 2**30:.2f} | {int(visit):,} ({served['nprobe']}) | {spec} | "
                             f"{r['search_p50']:.3f} | {r['search_p95']:.3f} | {r['recall_among_candidates']:.3f} | "
                             f"{r['recall_top10']:.3f} | {rss['RssAnon'] / 2**30:.2f} + {rss['RssFile'] / 2**30:.2f} |")
    scanned = [row for row in rows if "scan" in row]
    if scanned:
        lines += ["", f"The default ranking ({DEFAULT_NORMALIZATION}) served by its code scan instead "
                  "(`engine.search.CodeScan`: every document's coordinates times the ranking's weights, 4 bits a "
                  "coordinate, scanned whole; both signs per query):", "",
                  "| documents | build s | disk GiB | search p50 s | p95 s | scan top-10 among candidates (proponents) "
                  "| (opponents) | serving RSS GiB (own + mapped) |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in scanned:
            r = row["scan"]
            lines.append(f"| {row['documents']:,} | {r['build_s']:.0f} | {r['disk_bytes'] / 2**30:.2f} | "
                         f"{r['search_p50']:.3f} | {r['search_p95']:.3f} | {r['recall_among_candidates']:.3f} | "
                         f"{r['opponents_among_candidates']:.3f} | {r['rss']['RssAnon'] / 2**30:.2f} + "
                         f"{r['rss']['RssFile'] / 2**30:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

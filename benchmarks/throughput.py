"""Precompute throughput and query latency on a study, measured in one run.

Part 1, on the study's pretrained model and its own corpus, over exactly the same batches (the
study's max_length and batch_size, as its factor and projection stages batch them):

  (a) plain training: forward + loss.backward() into every parameter (the reference)
  (b) EK-FAC factor fitting, as the `factors-pretrained` stage runs it (engine.fit_factors)
  (c) gradient projection: engine.iter_projected_documents (raw projection + exact norms), and as
      the `projection` stage runs it (raw + whitened + norms)
  (d) exact scoring of every document for one multi-stage query (engine.score_documents)

each as documents/s, tokens/s and throughput relative to (a).

Part 2, one query's latency as the corpus grows: the searches a study serves (engine.search: the
flat scan of every row, and the staged search through faiss inverted lists on disk, then a re-rank
of full rows) over synthetic vectors of the study's whitened-index dimension, per size the build
time, memory and median top-k search (both signs, k = the study's `candidates`), added to what does
not depend on the corpus size, measured on the study: the query's gradient and preconditioning, and
exact re-scoring of a real candidate pool. benchmarks/ivf_scale.py takes the staged search to
10^6-10^7 documents.

    python benchmarks/throughput.py        # studies/demo -> docs/throughput.md, minutes on 2 cores

Flags: --study, --documents N (a subset), --sizes 1000 10000 100000, --threads 2, --ivf (also the
staged search), --quick (seconds, for CI), --out PATH. CPU only. 100k synthetic documents at the
demo's 16,384 dimensions hold about 6.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import faiss
import numpy as np
import torch

from engine import (
    encode_document_batches,
    fit_factors,
    iter_projected_documents,
    rescore,
    score_documents,
)
from engine.gradients import to_device
from engine.query import TASK
from engine.search import IVFLists, PCABasis, scan, staged_search
from engine.study import DEFAULT_STUDY, IndexSettings, OpenedStudy, layout, open_study
from explorer.tracer import Tracer

CHUNK = 8192  # synthetic rows drawn at a time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--study", type=Path, default=Path(DEFAULT_STUDY))
    p.add_argument("--documents", type=int, default=0,
                   help="first N corpus documents for part 1; 0 = all")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000],
                   help="synthetic corpus sizes for part 2")
    p.add_argument("--threads", type=int, default=2, help="torch and faiss threads")
    p.add_argument("--repeats", type=int, default=7, help="searches per size (median kept)")
    p.add_argument("--ivf", action="store_true", help="also IVF indexes (k-means: slow at 10k+)")
    p.add_argument("--quick", action="store_true", help="seconds-sized run (CI)")
    p.add_argument("--seed", type=int, default=0, help="synthetic vectors")
    p.add_argument("--out", type=Path, default=Path("docs/throughput.md"))
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.quick:
        args.documents = min(args.documents or 64, 64)
        args.sizes, args.repeats = [500, 2000], 3
    return args


# ---------------------------------------------------------------------------------------------
# timing


def seconds(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations
    return statistics.median(seconds(fn) for _ in range(repeats))


# ---------------------------------------------------------------------------------------------
# part 1: precompute stages over the same batches


def corpus_batches(study: OpenedStudy, limit: int) -> list[dict]:
    """The pipeline's own batching (factor and projection stages), encoded once so that no
    stage's time includes tokenisation."""
    texts = study.documents["text"][: limit or None]
    inf = study.config.influence
    return list(encode_document_batches(study.tokenizer, texts, inf.max_length, batch_size=inf.batch_size))


def train_step(model, batches) -> None:
    """What training costs: the same summed loss, backward into every parameter."""
    device = next(model.parameters()).device
    for batch in batches:
        model.zero_grad(set_to_none=True)
        TASK.sequence_losses(model, to_device(batch, device)).sum().backward()
    model.zero_grad(set_to_none=True)


def fit(study: OpenedStudy, batches) -> None:
    args = study.config.influence.factor_arguments(progress=False)  # as the pipeline fits
    fit_factors(study.pretrained.model, TASK, batches, study.pretrained.layers, args)


def project(study: OpenedStudy, batches, whiten: bool) -> None:
    """engine.iter_projected_documents: raw projection and exact norms, and with ``whiten`` the
    whitened eigen-coordinates too (the projection stage's work without its shard files)."""
    pt = study.pretrained
    for _ in iter_projected_documents(pt.model, TASK, batches, pt.layers, study.projector, norms=True,
                                      whitening=study.whitening if whiten else None, progress=False):
        pass


def score(study: OpenedStudy, batches, query) -> None:
    score_documents(study.pretrained.model, TASK, batches, study.pretrained.layers, query, progress=False)


@dataclass
class Stage:
    key: str
    label: str
    seconds: float


def precompute_stages(study: OpenedStudy, batches: list[dict], query) -> tuple[list[Stage], float, float]:
    """Every stage once after a one-batch warm-up; training is timed first and last (the machine
    is shared) and the faster is the reference. Returns (stages, first, last training time)."""
    inf = study.config.influence
    runs = [
        ("a", "plain training: forward + loss.backward() into every parameter",
         lambda b: train_step(study.pretrained.model, b)),
        ("b", f"EK-FAC fit (engine.fit_factors): covariance + correction passes, "
              f"{inf.label_samples} sampled label draw(s) each", lambda b: fit(study, b)),
        ("c1", "projection, engine.iter_projected_documents (raw Kronecker + exact norms)",
         lambda b: project(study, b, whiten=False)),
        ("c2", "projection stage as `msif precompute` runs it (raw + whitened + norms)",
         lambda b: project(study, b, whiten=True)),
        ("d", "exact scoring, 1 multi-stage query (engine.score_documents)",
         lambda b: score(study, b, query)),
    ]
    for _, _, run in runs:
        run(batches[:1])
    stages = []
    for key, label, run in runs:
        stages.append(Stage(key, label, seconds(lambda: run(batches))))
        print(f"  measured ({key}) {stages[-1].seconds:.2f} s", flush=True)
    first = stages[0].seconds
    last = seconds(lambda: train_step(study.pretrained.model, batches))
    stages[0].seconds = min(first, last)
    return stages, first, last


# ---------------------------------------------------------------------------------------------
# part 2: query latency as the corpus grows


def query_text(study: OpenedStudy) -> tuple[str, str, str]:
    """(instruction, context, answer): the demo world's first pretraining-only question with its
    answer, else (any study) the first fine-tuning record."""
    facts = study.path(layout.FACTS)
    if facts.exists():
        for fact in map(json.loads, facts.read_text().splitlines()):
            if fact["split"] == "pretrain_only":
                return fact["question"], "", fact["answer"]
    row = study.records[0]
    return row["instruction"], row["context"], row["response"]


def query_side(tracer: Tracer, text: tuple[str, str, str], repeats: int) -> dict:
    """What a query costs whatever the corpus size: its gradient at theta_ft with both inverses and
    the whitening, and exact re-scoring of the real candidate pool the study's index returns."""
    instruction, context, answer = text
    prompt = tracer.prompt_for(instruction, context)

    def prepare():
        q = tracer.engine.preconditioned([prompt], [answer], "multi-stage")
        return q, tracer.study.whitening.query_vectors(q.vectors)

    prep_s = median_seconds(prepare, repeats)
    query, vector = prepare()
    study = tracer.study
    found = study.index.search("whitened", vector, study.config.influence.candidates)
    ids = found.candidate_ids().tolist()
    rescore_s = median_seconds(lambda: rescore(found, study.pretrained.model, TASK, study.pretrained.layers,
                                               query, study.document_batches), repeats)
    tokens = sum(int(b["attention_mask"].sum()) for b in study.document_batches(ids))
    return {"prepare_s": prep_s, "rescore_s": rescore_s, "pool": len(ids), "pool_tokens": tokens,
            "query": query, "text": f"{instruction!r} -> {answer!r}"}


def synthetic_vectors(n: int, dim: int, rng: np.random.Generator,
                      planted: dict[int, np.ndarray]) -> np.ndarray:
    """(n, dim) standard-normal float32 rows (filled CHUNK rows at a time to bound temporaries),
    with ``planted`` rows overwritten."""
    vectors = np.empty((n, dim), np.float32)
    for start in range(0, n, CHUNK):
        vectors[start:start + CHUNK] = rng.standard_normal((min(CHUNK, n - start), dim),
                                                           dtype=np.float32)
    for row, vector in planted.items():
        vectors[row] = vector
    return vectors


def build_index(vectors: np.ndarray, kind: str, workdir: Path) -> tuple[Callable, float, int]:
    """The served search over ``vectors`` as the index stage builds it: ``flat`` scans every row;
    ``ivf`` fits a 256-dim principal basis and inverted lists on a sample, on disk. Returns
    (search(queries, k) -> Retrieval, build seconds, bytes the index adds)."""
    started = time.perf_counter()
    if kind == "flat":
        return (lambda q, k: scan([(0, vectors)], q, k)), time.perf_counter() - started, 0
    settings = IndexSettings("ivf")
    basis = PCABasis.fit(vectors[:: max(1, len(vectors) // settings.sample)], 256)
    sample = vectors[:: max(1, len(vectors) // settings.training_documents(len(vectors)))]
    nlist = settings.lists(len(vectors), len(sample))
    lists = IVFLists.build(workdir / f"ivf-{len(vectors)}", basis.transform(sample),
                           ((i, basis.transform(vectors[i:i + CHUNK])) for i in range(0, len(vectors), CHUNK)),
                           nlist, settings.probes(len(vectors), nlist))
    size = sum(f.stat().st_size for f in (workdir / f"ivf-{len(vectors)}").iterdir())

    def search(q, k):
        return staged_search(lists, basis, lambda ids: vectors[ids], q, k, settings.rerank)
    return search, time.perf_counter() - started, size


def index_latency(n: int, dim: int, k: int, kind: str, repeats: int, seed: int, workdir: Path) -> dict:
    """Build and search over ``n`` synthetic vectors; a query's best and worst matches are planted
    (+-3q: <q, 3q> ~ 3 dim, far above the random maximum ~ 4.5 sqrt(dim)) so the search can be checked."""
    rng = np.random.default_rng(seed)
    query = rng.standard_normal(dim, dtype=np.float32)
    pro, opp = (int(i) for i in rng.choice(n, 2, replace=False))
    vectors = synthetic_vectors(n, dim, rng, {pro: 3 * query, opp: -3 * query})
    search, build_s, size = build_index(vectors, kind, workdir)
    search_s = median_seconds(lambda: search(query[None], k), repeats)
    found = search(query[None], k)
    planted = bool(found.proponent_ids[0, 0] == pro and found.opponent_ids[0, 0] == opp)
    label = "flat scan" if kind == "flat" else "staged (faiss inverted lists on disk, re-rank)"
    return {"n": n, "kind": kind, "label": label, "build_s": build_s, "bytes": size, "search_s": search_s,
            "planted": planted}


# ---------------------------------------------------------------------------------------------
# report


def table(headers: list[str], rows: list[list], right: set[int]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join("---:" if i in right else "---" for i in range(len(headers))) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def stage_table(stages: list[Stage], docs: int, tokens: int) -> str:
    ref = stages[0].seconds
    rows = [[f"({s.key}) {s.label}", f"{s.seconds:.2f}", f"{docs / s.seconds:.1f}",
             f"{tokens / s.seconds:,.0f}", f"{ref / s.seconds:.2f}x"] for s in stages]
    return table(["stage", "time s", "docs/s", "tokens/s", "throughput vs (a)"], rows, {1, 2, 3, 4})


def latency_table(sizes: list[dict], side: dict, dim: int, k: int) -> str:
    fixed = side["prepare_s"] + side["rescore_s"]
    rows = []
    for s in sizes:
        total = fixed + s["search_s"]
        rows.append([f"{s['n']:,}", s["label"], f"{s['build_s']:.2f}", f"{s['bytes'] / 2**20:,.1f}",
                     f"{s['search_s'] * 1e3:.1f}", "yes" if s["planted"] else "NO",
                     f"{total:.2f}", f"{100 * s['search_s'] / total:.0f}%"])
    return table(["documents", "index", "build s", "memory MiB", f"search ms (top-{k}, both signs)",
                  "planted top-1", "end-to-end s", "search share"], rows, {0, 2, 3, 4, 6, 7})


def side_table(side: dict) -> str:
    rows = [["query gradient at theta_ft + both inverses (multi-stage) + whitening",
             f"{side['prepare_s']:.3f}"],
            [f"exact re-scoring of the study index's candidates ({side['pool']} documents, "
             f"{side['pool_tokens']:,} tokens; engine.rescore, batched as the app does)",
             f"{side['rescore_s']:.3f}"]]
    return table(["per query, whatever the corpus size", "time s"], rows, {1})


def reading(stages: list[Stage], sizes: list[dict], side: dict, dim: int, first: float,
            last: float, load: tuple[float, float]) -> list[str]:
    ratio = {s.key: stages[0].seconds / s.seconds for s in stages}
    lines = [f"EK-FAC fitting runs at {ratio['b']:.2f}x the training step's throughput (it captures "
             f"every batch once per pass and label draw, then eigendecomposes), the projection stage "
             f"at {ratio['c2']:.2f}x (raw projection alone {ratio['c1']:.2f}x) and exact scoring of "
             f"one query at {ratio['d']:.2f}x."]
    flat = [s for s in sizes if s["kind"] == "flat"]
    if flat:
        big, fixed = flat[-1], side["prepare_s"] + side["rescore_s"]
        total = fixed + big["search_s"]
        share = big["search_s"] / total
        crossover = fixed / (big["search_s"] / big["n"])  # search grows linearly in N
        lines.append(
            f"At {big['n']:,} documents the flat search takes {big['search_s'] * 1e3:.0f} ms, "
            f"{100 * share:.0f}% of the {total:.2f} s per query; "
            + (f"exact re-scoring of {side['pool']} candidates ({side['rescore_s']:.2f} s) dominates. "
               if share < 0.5 else "search dominates. ")
            + f"Extrapolated linearly, search equals the rest near {crossover:,.0f} documents, whose "
            f"flat index would hold {crossover * dim * 4 / 2**30:,.1f} GiB ({dim * 4:,} bytes a "
            f"document); beyond that an IVF index or a smaller eigen_dim cuts both.")
    lines.append(f"These are single wall-clock runs on {os.cpu_count()} cores, with a load average "
                 f"of {load[0]:.1f} at start and {load[1]:.1f} at end: on a shared machine they are "
                 f"noisy (the training reference took {first:.2f} s first and {last:.2f} s last; "
                 f"the faster is used), so read ratios to within 10-20%, more under load.")
    return lines


def busy(load_at_start: float, threads: int) -> bool:
    """Other jobs already filled the cores (later load averages include this run itself)."""
    return threads > 1 and load_at_start >= (os.cpu_count() or 1)


def render(args, study: OpenedStudy, stages, first, last, side, sizes, docs, tokens, padded,
           load: tuple[float, float]) -> str:
    inf = study.config.influence
    model = study.pretrained.model
    params = sum(p.numel() for p in model.parameters())
    dim, k = study.vectors.dim("whitened"), inf.candidates
    command = " ".join(["python benchmarks/throughput.py", *map(str, args.argv)])
    parts = [
        "# Throughput: precompute stages and query latency",
        "",
        f"Command: `{command}` ({date.today().isoformat()})",
        "",
        f"Machine: {os.cpu_count()} CPU cores; threads: torch {torch.get_num_threads()}, faiss "
        f"{faiss.omp_get_max_threads()}; CPU only; torch {torch.__version__}, faiss "
        f"{faiss.__version__}, python {platform.python_version()}; load average {load[0]:.2f} at "
        f"start, {load[1]:.2f} at end" + (" (busy: with several threads, contention inflates "
        "times; --threads 1 is steadier)" if busy(load[0], torch.get_num_threads()) else "") + ".",
        "",
        f"Study: `{args.study}`: {type(model).__name__}, {params:,} parameters, "
        f"{len(study.pretrained.layers)} tracked layers; {docs:,} of {len(study.documents):,} documents, "
        f"{tokens:,} tokens ({padded:,} with padding), max_length {inf.max_length}, batch_size "
        f"{inf.batch_size}, label_samples {inf.label_samples}; whitened index dimension {dim:,} "
        f"(raw vectors {study.vectors.dim('projected'):,}), {k} candidates per sign. Query (multi-stage): "
        f"{side['text']}.",
        "",
        "## Precompute throughput (same batches, one run)",
        "",
        stage_table(stages, docs, tokens),
        "",
        "## Query latency as the corpus grows",
        "",
        f"Synthetic standard-normal vectors of dimension {dim:,}, held in memory (the study reads them "
        "from its shards); search = the study's own search (a scan of every row, or the staged search: "
        "faiss inverted lists of 256 principal coordinates on disk, then a re-rank of full rows), top-k "
        f"of q and of -q, median of {args.repeats}; build = as the index stage builds it, its files' size "
        "as memory; end-to-end = query preparation + search + exact re-scoring (generation and heatmaps "
        "excluded).",
        "",
        side_table(side),
        "",
        latency_table(sizes, side, dim, k),
        "",
        "## Reading",
        "",
        *(f"- {line}" for line in reading(stages, sizes, side, dim, first, last, load)),
        "",
    ]
    return "\n".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    study = open_study(args.study, device="cpu")
    tracer = Tracer(study)
    batches = corpus_batches(study, args.documents)
    docs = sum(len(b["input_ids"]) for b in batches)
    tokens = int(sum(b["attention_mask"].sum() for b in batches))
    padded = sum(b["input_ids"].numel() for b in batches)
    print(f"study {args.study}: {docs} documents, {tokens:,} tokens, {len(batches)} batches, "
          f"torch threads: {torch.get_num_threads()}", flush=True)

    side = query_side(tracer, query_text(study), repeats=3)
    stages, first, last = precompute_stages(study, batches, side["query"])
    dim, k = study.vectors.dim("whitened"), study.config.influence.candidates
    sizes = []
    with tempfile.TemporaryDirectory(prefix="msif-throughput-") as workdir:
        for n, kind in ((n, kind) for n in args.sizes for kind in (("flat", "ivf") if args.ivf else ("flat",))):
            sizes.append(index_latency(n, dim, k, kind, args.repeats, args.seed, Path(workdir)))
            print(f"  index {kind} {n:,}: build {sizes[-1]['build_s']:.2f} s, search "
                  f"{sizes[-1]['search_s'] * 1e3:.1f} ms", flush=True)

    report = render(args, study, stages, first, last, side, sizes, docs, tokens, padded,
                    (load_start, os.getloadavg()[0]))
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

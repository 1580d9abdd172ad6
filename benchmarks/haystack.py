"""Serving a haystack: the demo plus N generated documents, searched by the study's staged index.

Build the study first (resumable; a larger N later recomputes only the new shards):

    msif build-demo --out studies/haystack --extra-documents 200000

then

    python benchmarks/haystack.py --study studies/haystack [--queries 24] [--exact] [--out docs/haystack.md]

Printed: build time per stage, disk size, index peak RAM; opening the study; per query, the split
of latency into the query gradient (+ preconditioning and whitening), the index search (coarse
scan and re-rank), exact re-scoring of the candidates, and a full trace with heatmaps; serving RSS;
recall@10/@100 of the index's ranking against an exhaustive scan of the whitened vectors (one pass
over the shards for all queries); with ``--exact``, recall@10 of the served top-10 (after exact
re-scoring) against exhaustive exact multi-stage scores of every document (one stacked pass over
the corpus for all queries) and the fact-tracing MRR of that exhaustive ranking. Every ranking is the
one `msif query` serves by default (``engine.normalization.DEFAULT``): the index, its scan and the
exact scores are all divided the same way. Queries are the
world's pretraining-only facts with their reference answers; a fact's sources are the documents
that state it (none of the haystack does). MRR of the served ranking counts a source outside the
served top-100 as not found (reciprocal rank 0); BM25 ranks the full corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from engine import BM25, rescore, score_documents
from engine.query import TASK
from engine.study import Stage, Study, layout, open_study
from explorer.tracer import Tracer

GIB = 2**30


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", type=Path, default=Path("studies/haystack"))
    p.add_argument("--queries", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--exact", action="store_true", help="also score every document exactly (one stacked pass)")
    p.add_argument("--out", type=Path, help="write the markdown report here")
    return p.parse_args(argv)


def facts(study: Study, limit: int) -> list[dict]:
    rows = [json.loads(line) for line in study.path(layout.FACTS).read_text().splitlines() if line]
    return [f for f in rows if f["split"] == "pretrain_only"][:limit]


def disk_bytes(study: Study) -> dict[str, int]:
    groups = {"document vectors (shards)": layout.SHARDS, "search index": layout.INDEX_DIR,
              "corpus": layout.DOCUMENTS, "haystack source": layout.HAYSTACK}
    out = {name: _du(study.path(a)) for name, a in groups.items()}
    out["total study"] = _du(study.root)
    return out


def _du(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0])


def reciprocal_rank(ranking, sources: set[int]) -> float:
    for rank, doc in enumerate(ranking, 1):
        if int(doc) in sources:
            return 1.0 / rank
    return 0.0


def overlap(a, b, k: int) -> float:
    return len(set(map(int, a[:k])) & set(map(int, b[:k]))) / k


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    study_dir = Study(args.study)
    manifest = study_dir.verify(layout.READER_STAGES)
    started = time.perf_counter()
    opened = open_study(args.study)
    open_s = time.perf_counter() - started
    tracer = Tracer(opened)
    rss_open = _rss()
    index = opened.index
    n_docs = opened.vectors.documents
    cases = facts(study_dir, args.queries)
    print(f"{args.study}: {n_docs:,} documents, index {index.kind}, opened in {open_s:.1f} s, "
          f"RSS {rss_open / GIB:.2f} GiB; {len(cases)} queries", flush=True)

    pool = opened.config.influence.candidates
    engine = tracer.engine
    norm = engine.normalization("multi-stage")  # the default ranking, as msif query serves it
    weights = engine.search_weights("multi-stage", norm, "whitened")
    ranking = engine.normalized_ranking("multi-stage", norm, exhaustive=False)
    rows, queries, served, pools = [], [], [], []
    for case in cases:
        prompt = tracer.prompt_for(case["question"])
        t0 = time.perf_counter()
        query = engine.preconditioned([prompt], [case["response"]], "multi-stage")
        vector = opened.whitening.query_vectors(query.vectors)
        t1 = time.perf_counter()
        clock: dict = {}
        found = index.search("whitened", vector, pool, weights, clock=clock)
        t2 = time.perf_counter()
        pt = opened.pretrained
        rescored = rescore(found, pt.model, TASK, pt.layers, query, opened.document_batches, ranking=ranking)
        t3 = time.perf_counter()
        tracer.trace(case["question"], case["response"], method="multi-stage", top_k=10)
        t4 = time.perf_counter()
        rows.append({"query_s": t1 - t0, "search_s": t2 - t1, "coarse_s": clock.get("coarse_s", t2 - t1),
                     "rerank_s": clock.get("rerank_s", 0.0), "rescore_s": t3 - t2, "trace_s": t4 - t3})
        queries.append((query, vector.numpy()[0]))
        served.append(found)
        pools.append(rescored)
    rss_serving = _rss()
    print("latency done", flush=True)

    vectors = np.stack([v for _, v in queries])
    t0 = time.perf_counter()
    truth = index.searches["whitened"].scan(vectors, 100, weights)
    scan_s = time.perf_counter() - t0
    big = index.search("whitened", vectors, 100, weights)
    recall = {k: statistics.mean(overlap(a, b, k) for a, b in zip(big.proponent_ids, truth.proponent_ids))
              for k in (10, 100)}
    sweep = rerank_sweep(index, vectors, truth, weights) if index.kind == "ivf" else []
    served_top10 = [p.head(10).proponent_ids[0] for p in pools]
    sources = [set(c["doc_ids"]) for c in cases]
    mrr_served = statistics.mean(reciprocal_rank(big.proponent_ids[i], sources[i]) for i in range(len(cases)))
    mrr_pool = statistics.mean(reciprocal_rank(served_top10[i], sources[i]) for i in range(len(cases)))
    t0 = time.perf_counter()
    bm25 = BM25(opened.documents["text"])
    bm25_build_s = time.perf_counter() - t0
    bm25_scores = bm25.score_prompt_answer([tracer.prompt_for(c["question"]) for c in cases],
                                           [c["response"] for c in cases])
    mrr_bm25 = statistics.mean(reciprocal_rank(np.argsort(-s, kind="stable")[:100], src)
                               for s, src in zip(bm25_scores, sources))
    exact = None
    if args.exact:
        t0 = time.perf_counter()
        stacked = _stack([q for q, _ in queries])
        pt = opened.pretrained
        scores = score_documents(pt.model, TASK, _all_batches(opened), pt.layers, stacked,
                                 progress=True).double().numpy()
        scores = norm.apply(scores, index.norms, index.norms)  # what the exhaustive ranking orders by
        exact = {"seconds": time.perf_counter() - t0,
                 "recall_at_10": statistics.mean(overlap(served_top10[i], np.argsort(-scores[i])[:10], 10)
                                                 for i in range(len(cases))),
                 "scan_vs_exact_at_10": statistics.mean(overlap(truth.proponent_ids[i], np.argsort(-scores[i])[:10],
                                                                10) for i in range(len(cases))),
                 "mrr": statistics.mean(reciprocal_rank(np.argsort(-scores[i])[:100], sources[i])
                                        for i in range(len(cases)))}
    report = render(args, manifest, study_dir, n_docs, index, open_s, rss_open, rss_serving, rows, recall, scan_s,
                    mrr_served, mrr_pool, mrr_bm25, bm25_build_s, exact, pool, sweep, norm)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0


def rerank_sweep(index, vectors: np.ndarray, truth, weights, sizes=(250, 500, 1000, 2000, 4000)) -> list[dict]:
    """Recall against the scan and search latency (one query at a time) as the re-rank pool grows."""
    search = index.searches["whitened"]
    configured, out = search.rerank, []
    try:
        for size in sizes:
            search.rerank = size
            seconds, ids = [], []
            for v in vectors:
                t0 = time.perf_counter()
                ids.append(search.search(v[None], 100, weights).proponent_ids[0])
                seconds.append(time.perf_counter() - t0)
            out.append({"rerank": size, "search_s": statistics.median(seconds),
                        **{f"at_{k}": statistics.mean(overlap(a, b, k) for a, b in zip(ids, truth.proponent_ids))
                           for k in (10, 100)}})
            print(f"  rerank {size}: recall@10 {out[-1]['at_10']:.3f}, search {out[-1]['search_s']:.3f} s", flush=True)
    finally:
        search.rerank = configured
    return out


def _stack(queries):
    """One PreconditionedQuery holding every query (rows), for one pass over the documents."""
    from dataclasses import replace

    first = queries[0]
    return replace(first, vectors={name: torch.cat([q.vectors[name] for q in queries]) for name in first.vectors})


def _all_batches(opened, chunk: int = 4096):
    for start in range(0, len(opened.documents), chunk):
        yield from opened.document_batches(range(start, min(start + chunk, len(opened.documents))))


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _p(values, q: float) -> float:
    return float(np.percentile(values, q))


def render(args, manifest, study, n_docs, index, open_s, rss_open, rss_serving, rows, recall, scan_s, mrr_served,
           mrr_pool, mrr_bm25, bm25_build_s, exact, pool, sweep, norm) -> str:
    stages = manifest["stages"]
    record = stages[Stage.INDEX]["search"]
    lines = [f"# Haystack: {n_docs:,} documents", "",
             f"`python benchmarks/haystack.py {' '.join(sys.argv[1:])}` ({date.today().isoformat()}, "
             f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads). Index: **{record['kind']}**"
             + (f" ({record['dims']} coordinates fit on {record['whitened']['queries']:,} fine-tuning records' "
                f"queries, keeping {record['whitened']['query_energy_kept']:.0%} of their energy; "
                f"re-rank {record['rerank']:,} per sign with full vectors)" if record["kind"] == "ivf" else "")
             + f"; {pool} candidates per sign re-scored exactly. Ranking: the default, `{norm}` "
             f"({norm.describe()}), in the index, its scan and the exact scores alike.", "",
             "## Build", "", "| stage | seconds | peak host RAM (GiB) |", "| --- | ---: | ---: |"]
    for name in (Stage.HAYSTACK, Stage.CORPUS, Stage.PROJECTION, Stage.INDEX):
        if name in stages:
            usage = stages[name].get("usage", {})
            lines.append(f"| {name} | {usage.get('seconds', float('nan')):.0f} | "
                         f"{usage.get('peak_host_bytes', 0) / GIB:.2f} |")
    lines += ["", "| on disk | GB | GiB |", "| --- | ---: | ---: |"]
    for name, size in disk_bytes(study).items():
        lines.append(f"| {name} | {size / 1e9:.2f} | {size / GIB:.2f} |")
    p50 = {k: _p([r[k] for r in rows], 50) for k in rows[0]}
    p95 = {k: _p([r[k] for r in rows], 95) for k in rows[0]}
    lines += ["", "## Serving", "",
              f"Opening the study (models, factors, memory maps): {open_s:.1f} s; RSS after opening "
              f"{rss_open / GIB:.2f} GiB, after all queries {rss_serving / GIB:.2f} GiB (peak).", "",
              "| per query (s) | p50 | p95 |", "| --- | ---: | ---: |"]
    names = {"query_s": "query gradient + preconditioning + whitening", "coarse_s": "index: coarse scan",
             "rerank_s": "index: re-rank with full vectors", "search_s": "index search (coarse + re-rank)",
             "rescore_s": f"exact re-scoring ({pool} per sign)", "trace_s": "full trace with heatmaps (end to end)"}
    for key, label in names.items():
        lines.append(f"| {label} | {p50[key]:.3f} | {p95[key]:.3f} |")
    lines.append(f"| search (everything before exact re-scoring) | {p50['query_s'] + p50['search_s']:.3f} | "
                 f"{p95['query_s'] + p95['search_s']:.3f} |")
    lines += ["", "## Recall and fact tracing", "",
              f"Against an exhaustive scan of the whitened vectors ({scan_s:.0f} s for all {len(rows)} queries "
              f"in one pass): recall@10 **{recall[10]:.3f}**, recall@100 **{recall[100]:.3f}**."]
    if sweep:
        lines += ["", "| re-ranked per sign | recall@10 vs scan | recall@100 vs scan | search p50 (s) |",
                  "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['rerank']:,} | {r['at_10']:.3f} | {r['at_100']:.3f} | {r['search_s']:.3f} |" for r in sweep]
        lines.append("")
    if exact:
        lines.append(f"Against exhaustive exact multi-stage scores of every document ({exact['seconds']:.0f} s, one "
                     f"stacked pass): served top-10 recall@10 **{exact['recall_at_10']:.3f}** (the whitened scan's "
                     f"top-10 itself: {exact['scan_vs_exact_at_10']:.3f}).")
    lines += ["", "| fact tracing (MRR of the sources) | MRR |", "| --- | ---: |",
              f"| multi-stage, served ranking (index top-100) | {mrr_served:.3f} |",
              f"| multi-stage, served top-10 after exact re-scoring | {mrr_pool:.3f} |"]
    if exact:
        lines.append(f"| multi-stage, exhaustive exact ranking | {exact['mrr']:.3f} |")
    lines.append(f"| BM25 over the full corpus (index built in {bm25_build_s:.0f} s) | {mrr_bm25:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Smaller document vectors, side by side: fact tracing served from each storage of the whitened rows.

For one seed's plain demo and its haystack (the studies benchmarks/normalization.py takes), every
stored whitened row is re-encoded as a study built with each ``vector_dtype`` would hold it
(``engine.storage.encode_vectors``; the rows are read as stored, float16 in the bench studies), and
scanned in full with each influence method's query vectors. The best ``--pool`` proponents by the
ranking's estimate are re-ranked by their exact scores under the default normalisation, taken from
normalization.py's exhaustive pass (its .npz: ``--scores``, computed and saved there if missing).
The Kronecker projection, which served the gradient methods before, is scanned the same way.

    MRR@10     mean over facts of 1 / rank of the best-ranked source (0 if none in the top 10)
    recall@10  mean over facts of the share of the exhaustive normalised top 10 that is served

A full scan isolates what the stored vectors lose; the staged index loses its own share on top.

    python benchmarks/vector_storage.py run --haystack studies/bench/seed-3-h30k --plain studies/bench/seed-3 \\
        --scores runs/normalization/seed-3.npz --out runs/vector_storage/seed-3.json
    python benchmarks/vector_storage.py report runs/vector_storage/*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from engine import PreconditionedQuery, iter_projected_documents
from engine.methods import DEFAULT_NORMALIZATION
from engine.normalization import Normalization
from engine.projection import Whitening
from engine.query import TASK, index_vectors
from engine.storage import decode_vectors, encode_vectors, vector_bytes
from explorer.tracer import Tracer

from fact_tracing import K, load_cases, query_vectors
from normalization import cached_pass, fact_metrics

METHODS = ("multi-stage", "pt-inverse-dropped", "gradient-dot")
STORAGES = ("float16", "int8", "int4")
FEWER = 1008  # coordinates a layer in the paper's config (int4 scales fit in 64 KiB beside them)


def kept_prefix(whitening: Whitening, per_layer: int) -> np.ndarray:
    """Columns of the whitened row holding each layer's first ``per_layer`` kept coordinates (largest Lambda)."""
    sizes = [len(k.flat) for k in whitening.coordinates.values()]
    starts = np.cumsum([0, *sizes[:-1]])
    return np.concatenate([np.arange(s, s + min(per_layer, n)) for s, n in zip(starts, sizes)])


def served(estimates: np.ndarray, exact: np.ndarray, divisor: np.ndarray, docs: np.ndarray, pool: int) -> np.ndarray:
    """Each query's top K proponents: the ``pool`` best of ``docs`` by the estimate over the divisor,
    re-ranked by the exact normalised scores (positive ones only, as served)."""
    pool = min(pool, len(docs) - 1)
    rows = []
    for i in range(len(exact)):
        guess = estimates[i, docs] / divisor[docs]
        picked = docs[np.argpartition(-guess, pool)[:pool]]
        values = exact[i, picked] / divisor[picked]
        order = [int(picked[j]) for j in np.argsort(-values, kind="stable")[:K] if values[j] > 0]
        rows.append(order + [-1] * (K - len(order)))
    return np.array(rows)


def wider_estimates(study, queries: dict[str, PreconditionedQuery], keeps: list[int]
                    ) -> tuple[dict[tuple, np.ndarray], dict[int, int]]:
    """Each method's estimates of every document's score from whitened rows that keep ``keeps``
    coordinates a layer (each stored as every storage would hold it), recomputed from the documents in
    one gradient pass at the largest keep: a layer's kept coordinates are in decreasing order of
    Lambda, so a smaller keep is a prefix of each layer's. Also: each keep's row length."""
    wide = Whitening(study.whitening.factors, study.whitening.damping, keep=max(keeps))
    q = {m: wide.query_vectors(query.vectors).numpy() for m, query in queries.items()}
    prefixes = {p: kept_prefix(wide, p) for p in keeps}
    out = {(m, storage, p): np.zeros((len(v), len(study.documents))) for m, v in q.items()
           for storage in STORAGES for p in keeps}
    pt = study.pretrained
    batches = study.document_batches(range(len(study.documents)))
    for part in iter_projected_documents(pt.model, TASK, batches, pt.layers, study.projector, whitening=wide,
                                         progress=True):
        for p, columns in prefixes.items():
            for storage in STORAGES:
                rows = decode_vectors(encode_vectors(even(part.whitened[:, columns]), storage), storage)
                for m, v in q.items():
                    out[m, storage, p][:, part.positions] = even(v[:, columns]) @ rows.T
    return out, {p: len(columns) for p, columns in prefixes.items()}


def even(rows: np.ndarray) -> np.ndarray:
    """int4 packs two numbers a byte: an odd row gets a zero column (no inner product changes)."""
    return rows if rows.shape[1] % 2 == 0 else np.pad(rows, ((0, 0), (0, 1)))


def run_seed(haystack: Path, plain: Path, scores: Path, pool: int, threads: int, limit: int | None,
             reference: bool = False, keeps: list[int] | None = None) -> dict:
    torch.set_num_threads(threads)
    tracer, world = Tracer.open(haystack), len(Tracer.open(plain).study.documents)
    study, engine = tracer.study, tracer.engine
    cases = load_cases(haystack, limit, reference)
    measured = cached_pass(engine, cases, world, scores)
    vectors = study.index.vectors
    stored = even(np.concatenate(list(vectors.chunks("whitened"))))
    fewer = kept_prefix(study.whitening, FEWER)
    rows = {name: decode_vectors(encode_vectors(stored, name), name) for name in STORAGES}
    rows[f"int4, {FEWER} a layer"] = decode_vectors(encode_vectors(even(stored[:, fewer]), "int4"), "int4")
    projected = np.concatenate(list(vectors.chunks("projected"))) if "projected" in vectors.kinds() else None
    norm = Normalization.parse(DEFAULT_NORMALIZATION)
    settings = {"plain": np.arange(world), "haystack": np.arange(vectors.documents)}
    out = {"haystack": str(haystack), "seed": study.manifest["demo"]["seed"], "facts": len(cases), "pool": pool,
           "normalization": str(norm), "whitened_dim": int(stored.shape[1]), "results": []}
    queries = {m: PreconditionedQuery(query_vectors(engine, cases, study.config.influence.score_arguments(m)), m)
               for m in METHODS}
    wider, wide_dims = wider_estimates(study, queries, keeps) if keeps else ({}, {})
    for method, query in queries.items():
        q = even(index_vectors("whitened", query, study.whitening, study.projector).numpy())
        exact = measured["scores"][method]
        divisor = norm.divisors(measured["norms"][method][norm.norm])
        estimates = {name: even(q[:, fewer]) @ r.T if "a layer" in name else q @ r.T for name, r in rows.items()}
        if projected is not None:  # stored unit-scale: times the exact norm is the raw estimate
            raw = index_vectors("projected", query, study.whitening, study.projector).numpy() @ projected.T
            estimates["projected (float16)"] = raw * measured["norms"][method]["gradient"]
        for (m, storage, p), estimate in wider.items():
            if m == method:
                estimates[f"{storage}, {p} a layer (recomputed)"] = estimate
        for setting, docs in settings.items():
            truth = np.argsort(-(exact[:, docs] / divisor[docs]), axis=1, kind="stable")[:, :K]
            for name, estimate in estimates.items():
                top = served(estimate, exact, divisor, docs, pool)
                agreement = [len(set(a.tolist()) & set(docs[b].tolist())) / K for a, b in zip(top, truth)]
                out["results"].append({"method": method, "setting": setting, "storage": name,
                                       "recall": agreement, "rr": fact_metrics(top, cases)["rr"]})
    dims = {name: FEWER * len(study.whitening.coordinates) if "a layer" in name else stored.shape[1] for name in rows}
    dims |= {f"{storage}, {p} a layer (recomputed)": d for storage in STORAGES for p, d in wide_dims.items()}
    out["bytes"] = {name: vector_bytes(d, name.split(",")[0]) for name, d in dims.items()}
    return out


def report(runs: list[dict]) -> str:
    """Mean MRR@10 and recall@10 over the seeds' facts, and each seed's MRR@10."""
    seeds = [r["seed"] for r in runs]
    lines = [f"Seeds {', '.join(map(str, seeds))}; {sum(r['facts'] for r in runs)} facts; a full scan of the stored "
             f"rows, {runs[0]['pool']} candidates a sign re-ranked exactly; ranking: {runs[0]['normalization']}.", "",
             "| method | setting | storage | bytes a row (demo) | MRR@10 | recall@10 | MRR@10 per seed |",
             "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    keys = list(dict.fromkeys((e["method"], e["setting"], e["storage"]) for e in runs[0]["results"]))
    for method, setting, storage in keys:
        per = [next(e for e in r["results"] if (e["method"], e["setting"], e["storage"]) == (method, setting, storage))
               for r in runs]
        rr = np.concatenate([e["rr"] for e in per])
        recall = np.concatenate([e["recall"] for e in per])
        size = runs[0]["bytes"].get(storage, "–")
        lines.append(f"| {method} | {setting} | {storage} | {size} | {rr.mean():.3f} | {recall.mean():.3f} | "
                     f"{' / '.join(format(np.mean(e['rr']), '.3f') for e in per)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="measure one seed")
    run.add_argument("--haystack", type=Path, required=True)
    run.add_argument("--plain", type=Path, required=True)
    run.add_argument("--scores", type=Path, required=True, help="normalization.py's .npz for this seed")
    run.add_argument("--pool", type=int, default=150, help="candidates a sign re-ranked exactly")
    run.add_argument("--limit", type=int, help="at most this many facts")
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--reference-answers", action="store_true", help="trace the facts' reference answers")
    run.add_argument("--eigen-dims", type=lambda text: [int(x) for x in text.split(",")], default=[],
                     help="also recompute the rows keeping these many coordinates a layer (e.g. 2048,4096): one "
                          "gradient pass over every document")
    run.add_argument("--out", type=Path, required=True)
    rep = commands.add_parser("report", help="pool the seeds' runs into one table")
    rep.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.command == "run":
        result = run_seed(args.haystack, args.plain, args.scores, args.pool, args.threads, args.limit,
                          args.reference_answers, args.eigen_dims)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result))
        print(report([result]))
    else:
        print(report([json.loads(p.read_text()) for p in args.runs]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fact tracing: do the methods find the pretraining documents that state the fact the model used?

A demo world is built with the given seed (or reused). For every pretraining-only fact that the
fine-tuned model answers correctly (world/qa_eval.json), its own answer is traced, and the
documents that state the fact (facts.jsonl ``doc_ids``) are the relevant set. Every document is
scored exactly by every method (no index), and we report

    MRR        mean over facts of 1 / rank of the best-ranked source document
    recall@10  mean over facts of |sources in the top 10| / |sources|

for multi-stage EK-FAC, single-stage, gradient dot product, gradient cosine, pt-inverse-dropped,
representation similarity and BM25; for multi-stage also as the app serves it (index candidates
re-scored exactly, top 10 only), with its damping and alpha varied, and with the query loss
restricted to the tokens that spell the fact (e.g. " Ardwick" in "... was born in Ardwick."), with
fewer tracked layers, and with per-head factors for the fused QKV layers (both stages refitted).
All queries of all variants share one exact gradient pass over the corpus per model.

    python benchmarks/fact_tracing.py --seed 0          # reuses studies/demo; other seeds build
                                                        # studies/demo-seed<N> first (~5 min)
    python benchmarks/fact_tracing.py --study DIR --tiny --out /tmp/t.md   # CI smoke version
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine import (
    PreconditionedQuery,
    ScoreArguments,
    encode_document_batches,
    encode_prompt_answer,
    fit_factors,
    precondition,
    score_documents,
    sequence_gradients,
)
from engine.methods import DEFAULT_NORMALIZATION
from engine.query import TASK, QueryEngine
from engine.study import DEFAULT_STUDY, Study, layout, open_study

K = 10


@dataclass
class Case:
    question: str
    answer: str  # the fine-tuned model's own (correct) response
    value: str  # the fact's answer, e.g. "Ardwick"
    relation: str
    subject: str
    sources: list[int]


def load_cases(study: Path, limit: int | None, reference: bool = False) -> list[Case]:
    """Pretraining-only facts the model answers correctly, with its answer; or, with ``reference``,
    every pretraining-only fact with the world's reference response (for models that cannot)."""
    facts = {f["fact_id"]: f for f in map(json.loads, Study(study).path(layout.FACTS).read_text().splitlines())}
    if reference:
        cases = [Case(f["question"], f["response"], f["answer"], f["relation"], f["subject"], f["doc_ids"])
                 for f in facts.values() if f["split"] == "pretrain_only"]
        return cases[:limit] if limit else cases
    rows = json.loads(Study(study).path(layout.QA_REPORT).read_text())["pretrain_only"]["rows"]
    cases = [Case(r["question"], r["response"], r["answer"], r["relation"], facts[r["fact_id"]]["subject"],
                  facts[r["fact_id"]]["doc_ids"])
             for r in rows if r["contains_answer"]]
    return cases[:limit] if limit else cases


def value_token_mask(service: QueryEngine, prompt: str, case: Case) -> torch.Tensor:
    """Which answer tokens overlap the characters of the fact's value in the response."""
    pieces = [service.study.tokenizer.decode([i]) for i in service.answer_tokens(prompt, case.answer)]
    start = "".join(pieces).rfind(case.value)  # offsets in the decoded pieces, not the raw text
    mask, offset = [], 0
    for piece in pieces:
        mask.append(start >= 0 and offset < start + len(case.value) and offset + len(piece) > start)
        offset += len(piece)
    return torch.tensor(mask)


def query_vectors(service: QueryEngine, cases: list[Case], args: ScoreArguments, factors: tuple | None = None
                  ) -> dict[str, torch.Tensor]:
    """Preconditioned query vectors (N, out, in) per layer, one row per case, in one batch."""
    study = service.study
    prompts = [service.study.prompts.prompt(c.question) for c in cases]
    batch = encode_prompt_answer(study.tokenizer, prompts, [c.answer for c in cases],
                                 study.config.influence.max_length)
    grads = sequence_gradients(study.finetuned.model, TASK, batch, study.finetuned.layers)
    pt, ft = factors or (study.pretrained.factors, study.finetuned.factors)
    return precondition(grads, args, pt, ft).vectors


def value_span_vectors(service: QueryEngine, cases: list[Case], args: ScoreArguments) -> dict[str, torch.Tensor]:
    """Multi-stage queries whose loss covers only the fact's tokens (sum of per-token queries)."""
    rows = []
    for case in cases:
        prompt = service.study.prompts.prompt(case.question)
        per_token = service.preconditioned([prompt], [case.answer], args.method, per_token=True).vectors
        mask = value_token_mask(service, prompt, case)
        rows.append({n: v[mask].sum(0, keepdim=True) for n, v in per_token.items()})
    return {n: torch.cat([r[n] for r in rows]) for n in rows[0]}


def per_head_factors(service: QueryEngine) -> tuple:
    """Both stages' factors refitted as the pipeline fits them, with the fused QKV layer's S split
    per attention head (FactorArguments.split_outputs)."""
    study = service.study
    inf = study.config.influence
    heads = study.pretrained.model.config.num_attention_heads
    args = inf.factor_arguments(progress=False, split_outputs={r"attention\.query_key_value": heads})
    texts = study.documents["text"][: inf.factor_documents or None]
    pt_batches = list(encode_document_batches(study.tokenizer, texts, inf.max_length, batch_size=inf.batch_size))
    pt = fit_factors(study.pretrained.model, TASK, pt_batches, study.pretrained.layers, args)
    ft = fit_factors(study.finetuned.model, TASK, study.record_batches(range(len(study.records))),
                     study.finetuned.layers, args)
    return pt, ft


def exhaustive(service: QueryEngine, blocks: dict[str, dict[str, torch.Tensor]], finetuned: bool
               ) -> dict[str, np.ndarray]:
    """Exact scores (N cases, D documents) for each named block of query vectors, one pass."""
    names = list(blocks)
    sizes = [next(iter(blocks[n].values())).shape[0] for n in names]
    stacked = {layer: torch.cat([blocks[n][layer] for n in names]) for layer in blocks[names[0]]}
    study = service.study
    side = study.finetuned if finetuned else study.pretrained
    scores = score_documents(side.model, TASK, study.document_batches(range(len(study.documents))), side.layers,
                             PreconditionedQuery(stacked, "multi-stage"), progress=False).double().numpy()
    return dict(zip(names, np.split(scores, np.cumsum(sizes)[:-1])))


def ranking_metrics(rankings: list[list[int]], cases: list[Case]) -> dict[str, float]:
    """MRR (0 when no source is in the list), recall@10, median rank of the first source."""
    rr, recall, first = [], [], []
    for ranked, case in zip(rankings, cases):
        position = {d: i + 1 for i, d in enumerate(ranked)}
        found = [position[d] for d in case.sources if d in position]
        best = min(found, default=None)
        rr.append(1.0 / best if best else 0.0)
        first.append(best if best else float("inf"))
        recall.append(sum(1 for d in case.sources if position.get(d, K + 1) <= K) / len(case.sources))
    return {"MRR": float(np.mean(rr)), "recall@10": float(np.mean(recall)),
            "top-1": float(np.mean([f == 1 for f in first])), "median first rank": statistics.median(first)}


def full_rankings(scores: np.ndarray) -> list[list[int]]:
    return [np.argsort(-row, kind="stable").tolist() for row in scores]


def run(study: Path, limit: int | None, threads: int, reference: bool = False, per_head: bool = True
        ) -> tuple[list[dict], list[dict], dict]:
    torch.set_num_threads(threads)
    service = QueryEngine(open_study(study))
    cases = load_cases(study, limit, reference)
    if not cases:
        raise SystemExit(f"{study}: the model answers no pretraining-only fact correctly")
    inf = service.study.config.influence
    base = dict(alpha=inf.alpha, damping=inf.damping, damping_factor=inf.damping_factor)
    started = time.perf_counter()
    pt_blocks = {m: query_vectors(service, cases, ScoreArguments(method=m, **base))
                 for m in ("multi-stage", "pt-inverse-dropped", "gradient-dot")}
    for factor in (0.001, 0.01, 1.0):
        pt_blocks[f"multi-stage, damping x{factor / inf.damping_factor:g}"] = query_vectors(
            service, cases, ScoreArguments(method="multi-stage", **{**base, "damping_factor": factor}))
    for scale in (0.1, 10.0):
        pt_blocks[f"multi-stage, alpha x{scale:g}"] = query_vectors(
            service, cases, ScoreArguments(method="multi-stage", **{**base, "alpha": inf.alpha * scale}))
    pt_blocks["multi-stage, fact tokens only"] = value_span_vectors(
        service, cases, ScoreArguments(method="multi-stage", **base))
    if per_head:
        pt_blocks["multi-stage, per-head QKV factors"] = query_vectors(
            service, cases, ScoreArguments(method="multi-stage", **base), per_head_factors(service))
    # Tracking fewer layers = dropping their blocks: EK-FAC is block-diagonal, so zeroing the
    # other layers' query vectors is exactly the influence with only these layers tracked.
    for group, pattern in (("MLP", ".mlp."), ("attention", ".attention.")):
        pt_blocks[f"multi-stage, {group} layers only"] = {
            n: v if pattern in n else torch.zeros_like(v) for n, v in pt_blocks["multi-stage"].items()}
    scores = exhaustive(service, pt_blocks, finetuned=False)
    scores.update(exhaustive(service, {"single-stage": query_vectors(
        service, cases, ScoreArguments(method="single-stage", **base))}, finetuned=True))
    norms = np.sqrt(service.study.sq_norms()).clip(min=1e-30)
    scores["gradient-cosine"] = scores["gradient-dot"] / norms  # the query's norm does not reorder
    for method in ("representation", "bm25"):
        scores[method] = np.stack([service.baseline_scores(service.study.prompts.prompt(c.question), c.answer,
                                                           method) for c in cases])
    exact_seconds = time.perf_counter() - started

    served = []  # multi-stage as the app serves it: index candidates, exact re-scoring, top 10
    default = pt_blocks["multi-stage"]
    for i in range(len(cases)):
        query = PreconditionedQuery({n: v[i:i + 1] for n, v in default.items()}, "multi-stage")
        found = service.retrieve(query, max(K, inf.candidates)).head(K)  # the default ranking
        served.append(found.proponent_ids[0].tolist())

    main_rows = []
    order = ["multi-stage", "single-stage", "gradient-dot", "gradient-cosine", "pt-inverse-dropped",
             "representation", "bm25"]
    for method in order:
        main_rows.append({"method": method, **ranking_metrics(full_rankings(scores[method]), cases)})
    main_rows.append({"method": f"multi-stage as served (index, {inf.candidates} candidates/sign, top 10, "
                                f"ranked by {DEFAULT_NORMALIZATION})",
                      **ranking_metrics(served, cases)})
    variant_rows = [{"method": name, **ranking_metrics(full_rankings(scores[name]), cases)}
                    for name in pt_blocks if name.startswith("multi-stage")]
    misses = {m: miss_breakdown(study, full_rankings(scores[m]), cases)
              for m in ("multi-stage", "multi-stage, damping x0.1", "bm25")}
    by_relation = {}
    for method in ("multi-stage", "bm25"):
        ranked = full_rankings(scores[method])
        for relation in sorted({c.relation for c in cases}):
            idx = [i for i, c in enumerate(cases) if c.relation == relation]
            by_relation.setdefault(relation, {"facts": len(idx)})[method] = ranking_metrics(
                [ranked[i] for i in idx], [cases[i] for i in idx])["MRR"]
    info = {"facts": len(cases), "documents": len(service.study.documents), "alpha": inf.alpha,
            "damping_factor": inf.damping_factor, "seconds": exact_seconds,
            "sources per fact": statistics.mean(len(c.sources) for c in cases)}
    return main_rows, variant_rows, {"info": info, "by_relation": by_relation, "misses": misses}


def miss_breakdown(study: Path, rankings: list[list[int]], cases: list[Case]) -> dict[str, float]:
    """What the top-10 holds besides the fact's sources (mean documents per fact), by how the
    document relates to the fact: about the subject, about the answer (e.g. the town), other."""
    docs = [json.loads(line) for line in Study(study).path(layout.WORLD_DOCUMENTS).read_text().splitlines()]
    counts = {"sources": 0.0, "same subject": 0.0, "about the answer": 0.0, "other entity": 0.0,
              "filler": 0.0}
    for ranked, case in zip(rankings, cases):
        for d in ranked[:K]:
            doc = docs[d]
            key = ("sources" if d in case.sources else "same subject" if doc.get("entity") == case.subject
                   else "about the answer" if doc.get("entity") == case.value
                   or case.value in doc["text"] else "filler" if doc.get("kind") == "filler" else "other entity")
            counts[key] += 1 / len(cases)
    return counts


def table(rows: list[dict]) -> str:
    cols = ["method", "MRR", "recall@10", "top-1", "median first rank"]
    lines = ["| " + " | ".join(cols) + " |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cells = [r["method"]] + [f"{r[c]:.3f}" if c != "median first rank" else f"{r[c]:g}" for c in cols[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def relation_table(by_relation: dict) -> str:
    lines = ["| relation | facts | multi-stage MRR | BM25 MRR |", "| --- | ---: | ---: | ---: |"]
    for relation, r in by_relation.items():
        lines.append(f"| {relation} | {r['facts']} | {r['multi-stage']:.3f} | {r['bm25']:.3f} |")
    return "\n".join(lines)


def miss_table(misses: dict[str, dict[str, float]]) -> str:
    cols = list(next(iter(misses.values())))
    lines = ["| method | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for method, counts in misses.items():
        lines.append(f"| {method} | " + " | ".join(f"{counts[c]:.2f}" for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="demo world seed (builds it if needed)")
    parser.add_argument("--study", type=Path, help="default: studies/demo (seed 0) or studies/demo-seed<N>")
    parser.add_argument("--tiny", action="store_true", help="tiny recipe (CI smoke run)")
    parser.add_argument("--limit", type=int, help="at most this many facts")
    parser.add_argument("--reference-answers", action="store_true",
                        help="trace the world's reference responses (all pretraining-only facts) "
                             "instead of the model's correct answers")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/fact_tracing.md"))
    args = parser.parse_args(argv)
    study = args.study or Path(DEFAULT_STUDY if args.seed == 0 else f"{DEFAULT_STUDY}-seed{args.seed}")
    from precompute.demo import build_demo, tiny_recipe

    build_demo(study, seed=args.seed, recipe=tiny_recipe() if args.tiny else None, progress=not args.tiny)
    main_rows, variant_rows, extra = run(study, args.limit, args.threads, args.reference_answers)
    info = extra["info"]
    report = "\n\n".join([
        "# Fact tracing on the demo world",
        f"`python benchmarks/fact_tracing.py --seed {args.seed}{' --tiny' if args.tiny else ''}"
        f"{' --reference-answers' if args.reference_answers else ''}` (study `{study}`): "
        f"{info['facts']} pretraining-only facts "
        + ("with their reference responses" if args.reference_answers else
           "the fine-tuned model answers correctly, traced through its own answers")
        + f", {info['documents']} documents, {info['sources per fact']:.1f} source documents per "
        f"fact; alpha = {info['alpha']:.4g}, damping = {info['damping_factor']:g} x mean eigenvalue per "
        f"layer. Every document scored exactly by every method ({info['seconds']:.0f} s for all).",
        "## Methods", table(main_rows),
        "## Multi-stage variants", table(variant_rows),
        "## By relation (MRR)", relation_table(extra["by_relation"]),
        "## What fills the top 10 (documents per fact)", miss_table(extra["misses"]),
    ]) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Counterfactual check: remove the documents a method ranks top, retrain, and see the answer move.

For several pretraining-only facts the fine-tuned model answers correctly, each method picks its
top-10 proponents of the model's answer (exact scores over every document); 10 random documents
per fact are the control. For each method, the union of its picks over the facts is removed from
the pretraining corpus, pretraining and fine-tuning are re-run with the demo's recipe and seed, and
the change in each answer's log-likelihood log p(answer | prompt) under the new fine-tuned model
is measured against the study's own models (same seed, same thread count: training is
deterministic, so the study's models are exactly the no-removal retrain).

Facts are about distinct subjects so one retrain per method serves all of them: removing one
fact's sources barely touches another's (the random control shows how much any removal moves
an answer). Goal: multi-stage removal lowers the log-likelihood at least twice as much as BM25's.

    python benchmarks/counterfactual.py                      # studies/demo, 8 facts, ~20-30 min here
    python benchmarks/counterfactual.py --facts 4 --methods multi-stage bm25 random
    python benchmarks/counterfactual.py --study DIR --tiny --reference-answers   # CI smoke version
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine.query import QueryEngine
from engine.study import DEFAULT_STUDY, Stage, Study, layout, open_study

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fact_tracing import Case, load_cases, value_token_mask  # noqa: E402  (a sibling benchmark script)

K = 10


def pick_cases(study: Path, n: int, reference: bool) -> list[Case]:
    """Up to ``n`` facts, one per subject (so removals for one barely touch another)."""
    chosen, subjects = [], set()
    for case in load_cases(study, None, reference):
        if case.subject not in subjects:
            subjects.add(case.subject)
            chosen.append(case)
        if len(chosen) == n:
            break
    return chosen


def answer_token_log_probs(model, tokenizer, prompt: str, answer: str, max_length: int) -> np.ndarray:
    """log p(token | prompt, earlier answer tokens) for each answer token; their sum is the
    answer's log-likelihood (the query's loss, negated)."""
    from engine import encode_prompt_answer

    batch = encode_prompt_answer(tokenizer, [prompt], [answer], max_length)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][0, 1:]
    logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
    keep = labels != -100
    return logp[keep].gather(-1, labels[keep].unsqueeze(-1)).squeeze(-1).numpy()


def measure(model, service: QueryEngine, cases: list[Case], prompts: list[str]) -> dict[str, list]:
    """Whole-answer and fact-token log-likelihoods, and whether greedy decoding still says the fact."""
    from precompute import training

    whole, fact = [], []
    for prompt, case in zip(prompts, cases):
        lp = answer_token_log_probs(model, service.study.tokenizer, prompt, case.answer,
                                    service.study.config.influence.max_length)
        whole.append(float(lp.sum()))
        fact.append(float(lp[value_token_mask(service, prompt, case).numpy()].sum()))
    said = training.generate(model, service.study.tokenizer, prompts)
    return {"whole": whole, "fact": fact, "correct": [c.value in r for c, r in zip(cases, said)]}


def choose_removals(service: QueryEngine, cases: list[Case], methods: list[str], seed: int
                    ) -> dict[str, list[list[int]]]:
    """Each method's top-10 proponents per fact (exact scores of every document); random control."""
    rng = random.Random(seed)
    picks = {}
    for method in methods:
        if method == "random":
            picks[method] = [rng.sample(range(len(service.study.documents)), K) for _ in cases]
            continue
        picks[method] = [service.rank([service.study.prompts.prompt(c.question)], [c.answer], method, K, "none",
                                      exhaustive=True)[0].proponents.ids.tolist() for c in cases]
    return picks


def retrain(study: Path, recipe, removed: set[int], threads: int):
    """Pretrain and fine-tune as the demo did, without the ``removed`` documents."""
    from precompute import training
    from precompute import world as world_lib
    from precompute.demo import training_tokenizer

    s = Study(study)
    world = world_lib.World.from_jsonl(s.path(layout.WORLD_DIR))
    tokenizer = training_tokenizer(s)
    kept = [d for d in world.documents if d["doc_id"] not in removed]
    config = training.demo_model_config(len(tokenizer), **recipe.model)
    pre = _with_threads(recipe.pretrain, threads)
    pt_model, _ = training.pretrain(config, tokenizer, kept, pre, progress=False)
    ft_model, _ = training.finetune(pt_model, tokenizer, world.finetune_records,
                                    _with_threads(recipe.finetune, threads), progress=False)
    return ft_model


def _with_threads(cfg, threads: int):
    from dataclasses import replace
    return replace(cfg, threads=threads)


def build_threads(study: Path) -> int:
    """The thread count the study was trained with (float reductions depend on it)."""
    manifest = Study(study).manifest()
    return int(manifest["stages"][Stage.PRETRAIN]["report"].get("threads") or torch.get_num_threads())


def run(study: Path, recipe, n_facts: int, methods: list[str], reference: bool, seed: int) -> dict:
    service = QueryEngine(open_study(study))
    cases = pick_cases(study, n_facts, reference)
    if not cases:
        raise SystemExit(f"{study}: no usable facts")
    prompts = [service.study.prompts.prompt(c.question) for c in cases]
    base = measure(service.study.finetuned.model, service, cases, prompts)
    picks = choose_removals(service, cases, methods, seed)
    threads = build_threads(study)
    results = {}
    for method in methods:
        removed = {d for per_fact in picks[method] for d in per_fact}
        started = time.perf_counter()
        model = retrain(study, recipe, removed, threads)
        after = measure(model, service, cases, prompts)
        sources = [len(set(per_fact) & set(c.sources)) for per_fact, c in zip(picks[method], cases)]
        results[method] = {"removed": len(removed), "sources_removed": sources,
                           "delta": [a - b for a, b in zip(after["whole"], base["whole"])],
                           "fact_delta": [a - b for a, b in zip(after["fact"], base["fact"])],
                           "correct": sum(after["correct"]), "seconds": time.perf_counter() - started}
        print(f"{method}: removed {len(removed)} documents, mean change "
              f"{np.mean(results[method]['delta']):+.3f} nats ({results[method]['seconds']:.0f} s)", flush=True)
    return {"cases": cases, "base": base, "results": results, "threads": threads}


def report(out: dict, command: str) -> str:
    cases, results = out["cases"], out["results"]
    lines = ["# Counterfactual check: remove the top-10, retrain, measure the answer", "",
             f"`{command}`: {len(cases)} facts, top-{K} proponents per fact removed (union per "
             f"method), pretraining + fine-tuning re-run with the demo recipe and seed "
             f"({out['threads']} threads). Change in log p(answer | prompt) in nats; negative = the "
             "removal made the model's answer less likely.", "",
             "| method | documents removed | sources removed / fact | mean change, answer | median | "
             "facts lowered | mean change, fact tokens | still answers correctly |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| (no removal: the study's models) | 0 | 0 | 0 | 0 | - | 0 | "
             f"{sum(out['base']['correct'])}/{len(cases)} |"]
    for method, r in results.items():
        lines.append(f"| {method} | {r['removed']} | {np.mean(r['sources_removed']):.1f} | "
                     f"{np.mean(r['delta']):+.3f} | {statistics.median(r['delta']):+.3f} | "
                     f"{sum(d < 0 for d in r['delta'])}/{len(cases)} | {np.mean(r['fact_delta']):+.3f} | "
                     f"{r['correct']}/{len(cases)} |")
    if "multi-stage" in results and "bm25" in results:
        ms, bm = np.mean(results["multi-stage"]["delta"]), np.mean(results["bm25"]["delta"])
        ratio = ms / bm if bm < 0 else float("inf")
        lines += ["", f"multi-stage / BM25 mean drop: {ratio:.2f}x (goal >= 2x: "
                      f"{'met' if ms < 0 and (bm >= 0 or ratio >= 2) else 'NOT met'})."]
    if "multi-stage" in results and "bm25" in results:
        ms, bm = np.mean(results["multi-stage"]["fact_delta"]), np.mean(results["bm25"]["fact_delta"])
        lines += [f"On the fact's own tokens: multi-stage {ms:+.3f}, BM25 {bm:+.3f} nats."]
    lines += ["", "Per fact (base log-likelihood of the answer, then its change for each method):", "",
              "| fact | answer | base | " + " | ".join(results) + " |",
              "| --- | --- | ---: |" + " ---: |" * len(results)]
    for i, case in enumerate(cases):
        lines.append(f"| {case.question} | {case.answer} | {out['base']['whole'][i]:.3f} | "
                     + " | ".join(f"{r['delta'][i]:+.3f}" for r in results.values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=Path(DEFAULT_STUDY))
    parser.add_argument("--facts", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["multi-stage", "bm25", "gradient-dot", "random"])
    parser.add_argument("--tiny", action="store_true", help="the study uses the tiny recipe (CI)")
    parser.add_argument("--reference-answers", action="store_true",
                        help="use the world's reference responses (models that answer nothing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random control")
    parser.add_argument("--out", type=Path, default=Path("docs/counterfactual.md"))
    args = parser.parse_args(argv)
    from precompute.demo import DemoRecipe, recipe_json, tiny_recipe

    recipe = tiny_recipe() if args.tiny else DemoRecipe()
    built = Study(args.study).manifest().get("demo", {})
    if built.get("recipe") != recipe_json(recipe):
        raise SystemExit(f"{args.study} was not built with the {'tiny' if args.tiny else 'default'} "
                         "demo recipe; retraining it another way would not be a counterfactual")
    out = run(args.study, recipe, args.facts, args.methods, args.reference_answers, args.seed)
    text = report(out, " ".join(["python benchmarks/counterfactual.py", *(argv or sys.argv[1:])]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

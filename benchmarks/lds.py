"""Linear datamodeling score (LDS) of multi-stage influence on the demo.

Both stages are retrained (the demo's recipe, seed and thread count) on M random halves S_j of the
pretraining corpus, with the same fine-tuning data. For each query q (a pretraining-only fact the
study's fine-tuned model answers correctly, with that answer), the retrained child's actual answer
log-likelihood f_j(q) = log p_j(answer | prompt) is compared with each method's prediction, the summed
raw influence of the half it was trained on, g_j(q) = sum over z in S_j of I(z, q) (exact scores of every
document, from the study's own models). LDS(q) = Spearman over j of (g_j(q), f_j(q)); the report gives
its mean over queries with a 95% bootstrap interval over queries (Park et al. 2023, TRAK).

Methods: multi-stage, pt-inverse-dropped, gradient-dot (documents at theta_pt) and single-stage
(documents at theta_ft, as benchmarks/fact_tracing.py scores them); the summed normalised scores of
the default ranking are shown for multi-stage too (a ranking device, not a linear model of removal).
Each retrain is saved as it finishes (``--work``; the demo's are kept in benchmarks/results/lds-demo, so
a run resumes on any clone), with the queries, recipe and thread count it must match to be reused.

    python benchmarks/lds.py --subsets 32                        # studies/demo; ~4 min a retrain here
    python benchmarks/lds.py --study DIR --tiny --subsets 3 --reference-answers --facts 4   # CI smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from engine.methods import DEFAULT_NORMALIZATION
from engine.normalization import Normalization
from engine.query import QueryEngine
from engine.study import DEFAULT_STUDY, OpenedStudy, Study, open_study

from counterfactual import answer_token_log_probs, build_threads, retrain
from fact_tracing import load_cases
from normalization import bootstrap, exhaustive_pass

METHODS = ("multi-stage", "pt-inverse-dropped", "single-stage", "gradient-dot")


def halves(documents: int, subsets: int, seed: int) -> list[np.ndarray]:
    """``subsets`` random halves of the corpus (document ids), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return [np.sort(rng.permutation(documents)[: documents // 2]) for _ in range(subsets)]


def log_likelihoods(model, study: OpenedStudy, cases) -> list[float]:
    max_length = study.config.influence.max_length
    return [float(answer_token_log_probs(model, study.tokenizer, study.prompts.prompt(c.question), c.answer,
                                         max_length).sum()) for c in cases]


def predictions(service: QueryEngine, cases, subsets: list[np.ndarray]) -> dict[str, np.ndarray]:
    """(queries, subsets) summed influence of each subset, per method."""
    measured = exhaustive_pass(service, cases)
    scores, norms = measured["scores"], measured["norms"]
    out = {m: np.stack([scores[m][:, s].sum(1) for s in subsets], 1) for m in METHODS}
    default = Normalization.parse(DEFAULT_NORMALIZATION)
    if not default.is_raw:
        n = norms["multi-stage"][default.norm]
        normalized = default.apply(scores["multi-stage"], n, n)
        out[f"multi-stage, normalised ({default})"] = np.stack([normalized[:, s].sum(1) for s in subsets], 1)
    return out


def run(study: Path, recipe, subsets: int, facts: int, reference: bool, seed: int, work: Path,
        threads: int | None = None, part: tuple[int, int] = (0, 1)) -> dict | None:
    from precompute.demo import recipe_json

    service = QueryEngine(open_study(study))
    cases = load_cases(study, facts, reference)
    if not cases:
        raise SystemExit(f"{study}: the model answers no pretraining-only fact correctly (try --reference-answers)")
    chosen = halves(len(service.study.documents), subsets, seed)
    threads = threads or build_threads(study)
    work.mkdir(parents=True, exist_ok=True)
    actual = []
    # what a saved retrain must match to be reused: its half, the queries, and how it was trained
    setting = {"queries": [[c.question, c.answer] for c in cases], "recipe": recipe_json(recipe), "threads": threads}
    for j, subset in enumerate(chosen):
        saved = work / f"subset-{j:03d}.json"
        record = json.loads(saved.read_text()) if saved.exists() else {}
        if record.get("documents") == subset.tolist() and all(record.get(k) == v for k, v in setting.items()):
            actual.append(record["log_likelihood"])
            continue
        if j % part[1] != part[0]:  # another process's retrain
            continue
        started = time.perf_counter()
        removed = set(range(len(service.study.documents))) - set(subset.tolist())
        model = retrain(study, recipe, removed, threads)
        actual.append(log_likelihoods(model, service.study, cases))
        saved.write_text(json.dumps({"documents": subset.tolist(), "log_likelihood": actual[-1], **setting,
                                     "seconds": time.perf_counter() - started}))
        print(f"subset {j + 1}/{subsets} retrained in {time.perf_counter() - started:.0f} s", flush=True)
    if len(actual) < len(chosen):
        print(f"part {part[0]}/{part[1]} done; {len(chosen) - len(actual)} retrains belong to other parts", flush=True)
        return None
    torch.set_num_threads(threads)
    predicted = predictions(service, cases, chosen)
    actual = np.array(actual).T  # (queries, subsets)
    lds = {m: [float(spearmanr(p, a).statistic) for p, a in zip(g, actual)] for m, g in predicted.items()}
    return {"study": str(study), "facts": len(cases), "subsets": subsets, "threads": threads, "lds": lds,
            "base": log_likelihoods(service.study.finetuned.model, service.study, cases),
            "spread": float(np.mean(actual.std(1)))}


def report(out: dict, command: str) -> str:
    lines = ["# Linear datamodeling score (LDS) on the demo", "",
             f"`{command}`: both stages retrained on {out['subsets']} random halves of the pretraining corpus "
             f"(the demo's recipe and seed, {out['threads']} training threads, the same fine-tuning data); "
             f"{out['facts']} queries (pretraining-only facts the fine-tuned model answers correctly, with its "
             "answer). LDS = Spearman, over the halves, between a method's summed influence of the half and the "
             "retrained child's answer log-likelihood; mean over queries with a 95% bootstrap interval over "
             f"queries. The retrained children's answer log-likelihoods vary by {out['spread']:.2f} nats "
             "(standard deviation over halves, mean over queries).", "",
             "| method | LDS | queries with LDS > 0 |", "| --- | ---: | ---: |"]
    for method, values in out["lds"].items():
        values = np.nan_to_num(np.array(values))
        mean, low, high = bootstrap([values])
        lines.append(f"| {method} | {mean:.3f} [{low:.3f}, {high:.3f}] | {int((values > 0).sum())}/{len(values)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=Path(DEFAULT_STUDY))
    parser.add_argument("--subsets", type=int, default=32)
    parser.add_argument("--facts", type=int, default=40, help="at most this many queries")
    parser.add_argument("--tiny", action="store_true", help="the study uses the tiny recipe (CI)")
    parser.add_argument("--reference-answers", action="store_true",
                        help="use the world's reference responses (models that answer nothing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random halves")
    parser.add_argument("--threads", type=int, help="training threads (default: the study's, which reproduces it)")
    parser.add_argument("--part", default="0/1", help="I/N: retrain only halves j with j %% N == I (N processes "
                                                     "share the retrains; the last to finish reports)")
    parser.add_argument("--work", type=Path, help="where retrains are saved (default: runs/lds/<study name>; "
                                                  "the demo's: benchmarks/results/lds-demo)")
    parser.add_argument("--out", type=Path, default=Path("docs/lds.md"))
    args = parser.parse_args(argv)
    from precompute.demo import DemoRecipe, recipe_json, tiny_recipe

    recipe = tiny_recipe() if args.tiny else DemoRecipe()
    if Study(args.study).manifest().get("demo", {}).get("recipe") != recipe_json(recipe):
        raise SystemExit(f"{args.study} was not built with the {'tiny' if args.tiny else 'default'} demo recipe; "
                         "retraining it another way would not be a counterfactual")
    work = args.work or Path("runs/lds") / Study(args.study).root.name
    index, count = (int(x) for x in args.part.split("/"))
    out = run(args.study, recipe, args.subsets, args.facts, args.reference_answers, args.seed, work, args.threads,
              (index, count))
    if out is None:
        return 0
    text = report(out, " ".join(["python benchmarks/lds.py", *(argv if argv is not None else sys.argv[1:])]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    (work / "lds.json").write_text(json.dumps(out))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

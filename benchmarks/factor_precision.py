"""Factor fitting precision and storage on a study: float32 running sums against float64 sums.

Fits the pretrained model's factors twice on the study's own corpus, as the pipeline fits them
(same label draws), with `accumulation = float32` (the default) and `float64`, then prints:
- the largest relative error of the corrected eigenvalues Lambda, per layer relative to that
  layer's largest eigenvalue, and elementwise over the eigenvalues above 1e-6 of it;
- the multi-stage scores of every document for the study's questions with either set of
  factors: largest relative error (to the largest score) and the top-10 overlap;
- the factor directory's size on disk and the time to read all of it.

    python benchmarks/factor_precision.py [--study studies/demo] [--queries 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engine import Factors, encode_document_batches, fit_factors, precondition, score_documents, sequence_gradients
from engine.query import TASK
from engine.study import DEFAULT_STUDY, layout
from explorer.tracer import Tracer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retrieval import load_questions  # noqa: E402  (a sibling benchmark script)


def fit_both(tracer: Tracer, out: Path) -> dict[str, Factors]:
    study, inf = tracer.study, tracer.study.config.influence
    texts = study.documents["text"][: inf.factor_documents or None]
    batches = list(encode_document_batches(study.tokenizer, texts, inf.max_length, batch_size=inf.batch_size))
    fitted = {}
    for precision in ("float32", "float64"):
        args = inf.factor_arguments(progress=False, accumulation=precision)
        started = time.perf_counter()
        fitted[precision] = fit_factors(study.pretrained.model, TASK, batches, study.pretrained.layers, args,
                                        out=out / precision)
        print(f"  fit with {precision} sums: {time.perf_counter() - started:.1f} s", flush=True)
    return fitted


def lambda_errors(fitted: dict[str, Factors]) -> tuple[float, float]:
    to_max, elementwise = 0.0, 0.0
    for name in fitted["float64"].layers:
        lo, hi = (fitted[p].layers[name].corrected_eigenvalues.double() for p in ("float32", "float64"))
        top = float(hi.abs().max())
        to_max = max(to_max, float((lo - hi).abs().max()) / top)
        big = hi.abs() > 1e-6 * top
        elementwise = max(elementwise, float(((lo - hi).abs()[big] / hi.abs()[big]).max()))
    return to_max, elementwise


def score_errors(tracer: Tracer, fitted: dict[str, Factors], questions: list[str]) -> tuple[float, float]:
    study = tracer.study
    prompts = [tracer.prompt_for(q) for q in questions]
    answers = [tracer.generate(q) for q in questions]
    from engine import encode_prompt_answer

    batch = encode_prompt_answer(study.tokenizer, prompts, answers, study.config.influence.max_length)
    grads = sequence_gradients(study.finetuned.model, TASK, batch, study.finetuned.layers)
    args = study.config.influence.score_arguments("multi-stage")
    docs = study.document_batches(range(len(study.documents)))
    scores = {p: score_documents(study.pretrained.model, TASK, docs, study.pretrained.layers,
                                 precondition(grads, args, fitted[p], study.finetuned.factors),
                                 progress=False).double().numpy()
              for p in fitted}
    lo, hi = scores["float32"], scores["float64"]
    worst = float((np.abs(lo - hi).max(axis=1) / np.abs(hi).max(axis=1)).max())
    overlap = np.mean([len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10 for a, b in zip(lo, hi)])
    return worst, float(overlap)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=Path(DEFAULT_STUDY))
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tracer = Tracer.open(args.study, device="cpu")
    directory = tracer.study.path(layout.PT_FACTORS)
    size = sum(p.stat().st_size for p in directory.iterdir())
    started = time.perf_counter()
    stored = Factors.load(directory)
    for name in stored.layers:
        stored.layers[name]
    load_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        fitted = fit_both(tracer, Path(tmp))
        lam_max, lam_each = lambda_errors(fitted)
        questions = load_questions(args.study, args.queries)
        worst, overlap = score_errors(tracer, fitted, questions)
    print(f"\nstudy {args.study}: {len(stored.layers)} tracked layers; torch threads {args.threads}")
    print(f"{'measure':<70}{'value':>12}")
    print("-" * 82)
    print(f"{'Lambda, float32 vs float64 sums: max |error| / layer max':<70}{lam_max:>12.2e}")
    print(f"{'Lambda, same, elementwise relative over eigenvalues > 1e-6 x max':<70}{lam_each:>12.2e}")
    print(f"{f'multi-stage scores ({len(questions)} queries x all documents): max |error| / max |score|':<70}"
          f"{worst:>12.2e}")
    print(f"{'top-10 overlap of the two rankings':<70}{overlap:>12.3f}")
    print(f"{'factor directory of theta_pt on disk, MiB':<70}{size / 2**20:>12.1f}")
    print(f"{'read every layer of it, s':<70}{load_s:>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

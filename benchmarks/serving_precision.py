"""Factors held in less memory for serving: how much the explorer's scores move against float32 factors.

The explorer keeps both factor sets on the device; at the paper's scale (Pythia-2.8B -> dolly-v2-3b)
that is 90 GiB in float32 (``msif plan``). Holding them in bfloat16 or float16 halves that (the
preconditioning still computes in float32, upcasting one layer at a time). For each precision, the
multi-stage scores of every document are compared with those of float32 factors, for raw influence
and for normalised rankings; so are truncated eigenbases (each Kronecker factor's top
share of eigenvectors kept exactly, damping alone on the rest: ``Factors.truncated``), on both settings:

    rel. error   max |s16 - s32| / max |s32| over all (query, document) pairs
    Spearman     rank correlation of one query's scores, mean over queries
    top-10       overlap of the top 10 proponents, mean over queries

on two settings: a study (the demo: its own models, factors and questions), and a random-weight
model of a real shape (``--shape pythia-160m``) whose factors are fit on random token sequences.

    python benchmarks/serving_precision.py [--study studies/demo] [--shape pythia-160m]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from engine import (
    FactorArguments,
    Factors,
    LanguageModelingTask,
    ScoreArguments,
    find_tracked_layers,
    fit_factors,
    measure_documents,
    precondition,
    sequence_gradients,
)
from engine.normalization import Normalization
from engine.study import DEFAULT_STUDY, open_study

TASK = LanguageModelingTask()
PRECISIONS = ("bfloat16", "float16")
# truncated eigenbases (``Factors.truncated``): each Kronecker factor's top share of eigenvectors, damping on the rest
TRUNCATIONS = (0.5, 0.25)
RANKINGS = ("none", "gradient", "gradient^0.5")
MODELS = Path(__file__).resolve().parents[1] / "assets" / "models"


def compare(reference: np.ndarray, other: np.ndarray, norms: np.ndarray) -> dict[str, dict[str, float]]:
    """Per ranking: relative error, mean Spearman and mean top-10 overlap of (queries, documents) scores."""
    out = {}
    for spec in RANKINGS:
        norm = Normalization.parse(spec)
        a, b = (norm.apply(s, norms, norms) if not norm.is_raw else s for s in (reference, other))
        top = [len(set(np.argsort(-x)[:10]) & set(np.argsort(-y)[:10])) / 10 for x, y in zip(a, b)]
        out[spec] = {"relative_error": float(np.abs(a - b).max() / np.abs(a).max()),
                     "spearman": float(np.mean([spearmanr(x, y).statistic for x, y in zip(a, b)])),
                     "top10": float(np.mean(top))}
    return out


def scores(doc_model, doc_layers, docs, query_grads, args: ScoreArguments, pt: Factors, ft: Factors):
    u = precondition(query_grads, args, pt, ft)
    measured = measure_documents(doc_model, TASK, docs, doc_layers, u, progress=False)
    return measured.scores.numpy(), np.sqrt(measured.sq_norms.numpy())


def on_study(path: Path, questions: int) -> dict:
    """The demo: its questions' reference answers against every document, multi-stage, with the factor
    sets held as the explorer holds them (``open_study(..., factor_precision=...)``)."""
    import json

    from engine.study import layout
    from engine.text import encode_prompt_answer

    reference = open_study(path, device="cpu", factor_precision="float32")
    facts = [json.loads(line) for line in reference.path(layout.FACTS).read_text().splitlines()]
    facts = [f for f in facts if f["split"] == "pretrain_only"][:questions]
    batch = encode_prompt_answer(reference.tokenizer, [reference.prompts.prompt(f["question"]) for f in facts],
                                 [f["response"] for f in facts], reference.config.influence.max_length)
    ft, pt = reference.finetuned, reference.pretrained
    grads = sequence_gradients(ft.model, TASK, batch, ft.layers)
    args = reference.config.influence.score_arguments("multi-stage")
    docs = reference.document_batches(range(len(reference.documents)))
    base, norms = scores(pt.model, pt.layers, docs, grads, args, pt.factors, ft.factors)
    results = {}
    for precision in PRECISIONS:
        held = open_study(path, device="cpu", factor_precision=precision)
        results[precision] = compare(base, scores(pt.model, pt.layers, docs, grads, args, held.pretrained.factors,
                                                  held.finetuned.factors)[0], norms)
    for keep in TRUNCATIONS:
        cut = [f.truncated(keep) for f in (pt.factors, ft.factors)]
        results[truncation(keep)] = compare(base, scores(pt.model, pt.layers, docs, grads, args, *cut)[0], norms)
    return {"setting": f"`{path}` ({len(reference.documents):,} documents, {len(facts)} questions)", **results}


def truncation(keep: float) -> str:
    return f"float32, top {keep:.0%} of eigenvectors"


def on_shape(shape: str, documents: int, queries: int, length: int, seed: int = 0) -> dict:
    """A random-weight model of a real shape: factors fit on random sequences, random queries."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(MODELS / shape)
    # float32 weights: the shipped configs say float16, which CPUs multiply about 40x slower (1.7 s against
    # 70 s per covariance batch of pythia-70m here), and the explorer's scoring runs in float32 anyway
    pt = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ft = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # a child: the parent moved a little
        for a, b in zip(ft.parameters(), pt.parameters()):
            a.copy_(b + 0.02 * b.std() * torch.randn_like(b))
    vocab = config.vocab_size

    def batches(n: int, start: int) -> list[dict]:
        g = torch.Generator().manual_seed(seed + start)
        out = []
        for i in range(0, n, 8):
            ids = torch.randint(0, vocab, (min(8, n - i), length), generator=g)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        return out

    pt_layers, ft_layers = find_tracked_layers(pt), find_tracked_layers(ft)
    results = {}
    with tempfile.TemporaryDirectory(prefix="msif-precision-") as tmp:
        fit = FactorArguments(progress=False)
        pt_f = fit_factors(pt, TASK, batches(64, 1000), pt_layers, fit, out=Path(tmp) / "pt")
        ft_f = fit_factors(ft, TASK, batches(64, 2000), ft_layers, fit, out=Path(tmp) / "ft")
        query = batches(queries, 3000)[0]
        query["labels"][:, : length // 2] = -100  # the answer: the second half
        grads = sequence_gradients(ft, TASK, query, ft_layers)
        args = ScoreArguments(method="multi-stage", alpha=1.0)
        docs = batches(documents, 4000)
        base, norms = scores(pt, pt_layers, docs, grads, args, pt_f, ft_f)
        for precision in PRECISIONS:
            dtype = getattr(torch, precision)
            low = [Factors.load(Path(tmp) / side, dtype=dtype) for side in ("pt", "ft")]
            results[precision] = compare(base, scores(pt, pt_layers, docs, grads, args, *low)[0], norms)
        for keep in TRUNCATIONS:
            cut = [f.truncated(keep) for f in (pt_f, ft_f)]
            results[truncation(keep)] = compare(base, scores(pt, pt_layers, docs, grads, args, *cut)[0], norms)
    return {"setting": f"random-weight {shape} ({documents} random documents of {length} tokens, {queries} queries)",
            **results}


def report(rows: list[dict]) -> str:
    lines = ["| setting | factors | ranking | rel. error | Spearman | top-10 overlap |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for row in rows:
        for choice in [c for c in row if c != "setting"]:
            for spec, r in row[choice].items():
                lines.append(f"| {row['setting']} | {choice} | {spec} | {r['relative_error']:.2e} | "
                             f"{r['spearman']:.5f} | {r['top10']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=Path(DEFAULT_STUDY))
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--shape", default="pythia-160m", help="a config under assets/models, or none")
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [on_study(args.study, args.questions)]
    if args.shape != "none":
        rows.append(on_shape(args.shape, args.documents, 8, args.length))
    text = ("# Factors held in less memory for serving, against float32\n\n`python benchmarks/serving_precision.py "
            f"{' '.join(argv if argv is not None else [])}`: multi-stage scores of every document.\n\n" + report(rows))
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

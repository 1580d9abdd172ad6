"""The engine against Kronfluence on the same single-stage EK-FAC job, in one process.

Both get the same randomly initialised GPT-NeoX (built from a config: nothing is downloaded), the
same documents in the same batches, the same tracked layers (every Linear inside the blocks) and
the same sampled labels, and their conventions are matched:

- losses are sums over a sequence's scored tokens (Kronfluence expects summed losses);
- the Fisher is that of the mean over sequences: EK-FAC's corrected eigenvalues Lambda are divided
  by the number of sequences in both (Kronfluence divides S by tokens, the engine by sequences, which
  changes no eigenvector and so no EK-FAC number);
- damping per layer 0.1 x mean Lambda (Kronfluence's ``damping_factor=None``, its heuristic: a number
  there is an absolute damping; the engine's ``damping_factor=0.1``);
- labels for the true Fisher drawn once per document from the model and given to both, for both
  passes (``sample=True`` reads them);
- sign: both score ``grad L_q^T (H + lambda I)^-1 grad L_z`` with L the summed loss: positive means
  upweighting the document raises the query's log-likelihood (Kronfluence: "helpful").

It prints fit and scoring wall times (medians of ``--repeats``, 1 torch thread), their ratios
engine / Kronfluence, with Kronfluence as installed and with its ``release_memory`` (``gc.collect``
and ``torch.compiler.reset`` after every stage) replaced by a no-op, and the agreement of the two
score matrices (Spearman, Pearson, relative error).

Kronfluence is optional; its own requirements pull another torch build, so install it without them:

    pip install --no-deps kronfluence accelerate einconv einops opt_einsum

    python benchmarks/vs_kronfluence.py                     # both sizes (tiny, Pythia-14m shape)
    python benchmarks/vs_kronfluence.py --sizes tiny --repeats 1   # a smoke run (~1 minute)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from engine import (
    FactorArguments,
    LanguageModelingTask,
    ScoreArguments,
    find_tracked_layers,
    fit_factors,
    precondition,
    score_documents,
    sequence_gradients,
)
from engine.tasks import IGNORE


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    heads: int
    vocab: int
    docs: int
    seq_len: int


SIZES = {
    "tiny": Size("tiny (hidden 64, 2 blocks)", 64, 2, 2, 512, 256, 64),
    "pythia-14m": Size("Pythia-14m shape (hidden 128, 6 blocks, vocab 50304)", 128, 6, 4, 50304, 256, 128),
}
BATCH, QUERIES, QUERY_LEN, PROMPT = 8, 16, 32, 24


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median kept)")
    p.add_argument("--docs", type=int, help="override the documents per size")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# -- the job --------------------------------------------------------------------------------------
def build_model(size: Size, seed: int) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=size.vocab, hidden_size=size.hidden, num_hidden_layers=size.layers,
                           num_attention_heads=size.heads, intermediate_size=4 * size.hidden,
                           max_position_embeddings=max(size.seq_len, QUERY_LEN), rotary_pct=0.25,
                           tie_word_embeddings=False)
    return GPTNeoXForCausalLM(config).eval()


def make_documents(model, size: Size, docs: int, seed: int) -> list[dict]:
    """Right-padded random-token documents (lengths seq_len/2..seq_len), each with labels sampled
    once from the model (shared by both tools and both passes)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(size.seq_len // 2, size.seq_len + 1, (docs,), generator=g)
    ids = torch.randint(1, size.vocab, (docs, size.seq_len), generator=g)
    mask = (torch.arange(size.seq_len)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, IGNORE)
    sampled = torch.empty_like(labels)
    with torch.no_grad():
        for start in range(0, docs, BATCH):
            part = slice(start, start + BATCH)
            probs = torch.softmax(model(input_ids=ids[part], attention_mask=mask[part]).logits.float(), -1)
            drawn = torch.multinomial(probs.flatten(0, 1), 1, generator=g).view(probs.shape[:2])
            # the label at position t is predicted from t - 1 (shifted inside the loss)
            sampled[part] = torch.cat([drawn[:, :1], drawn[:, :-1]], 1).masked_fill(mask[part] == 0, IGNORE)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i], "sampled": sampled[i]}
            for i in range(docs)]


def make_queries(size: Size, seed: int) -> list[dict]:
    """Prompt + answer rows: the first PROMPT tokens unscored."""
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(1, size.vocab, (QUERIES, QUERY_LEN), generator=g)
    labels = ids.clone()
    labels[:, :PROMPT] = IGNORE
    return [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": labels[i]}
            for i in range(QUERIES)]


def collate(rows: list[dict]) -> dict:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def batches(rows: list[dict]) -> list[dict]:
    return [collate(rows[i:i + BATCH]) for i in range(0, len(rows), BATCH)]


class SharedLabels(LanguageModelingTask):
    """The engine's LM task, reading the shared sampled labels when asked to sample."""

    def token_losses(self, model, batch, *, sample=False, generator=None):
        if sample:
            batch = {**batch, "labels": batch["sampled"]}
        return super().token_losses(model, batch)


def summed_loss(model, batch: dict, labels: str) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch[labels][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


# -- the engine -----------------------------------------------------------------------------------
def engine_fit(model, docs: list[dict]):
    layers = find_tracked_layers(model)
    args = FactorArguments(strategy="ekfac", fisher="true", label_samples=1, progress=False)
    return fit_factors(model, SharedLabels(), batches(docs), layers, args)


def engine_scores(model, factors, docs: list[dict], queries: list[dict]) -> torch.Tensor:
    layers, task = find_tracked_layers(model), SharedLabels()
    grads = sequence_gradients(model, task, collate(queries), layers)
    query = precondition(grads, ScoreArguments(method="single-stage", damping_factor=0.1), ft_factors=factors)
    return score_documents(model, task, batches(docs), layers, query, progress=False)


# -- Kronfluence ----------------------------------------------------------------------------------
def kronfluence_job(model, docs: list[dict], queries: list[dict], tracked: list[str]):
    """(fit, score) closures over one prepared copy of the model."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments as KFactorArguments
    from kronfluence.arguments import ScoreArguments as KScoreArguments
    from kronfluence.task import Task

    class KTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return summed_loss(model, batch, "sampled" if sample else "labels")

        def compute_measurement(self, batch, model):
            return summed_loss(model, batch, "labels")

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    task = KTask()
    model = prepare_model(copy.deepcopy(model), task)
    out = tempfile.mkdtemp(prefix="msif-kronfluence-")
    analyzer = Analyzer("bench", model=model, task=task, cpu=True, disable_tqdm=True, disable_model_save=True,
                        output_dir=out)

    def fit():
        analyzer.fit_all_factors("ekfac", dataset=docs, per_device_batch_size=BATCH, overwrite_output_dir=True,
                                 factor_args=KFactorArguments(strategy="ekfac", use_empirical_fisher=False))

    def score():
        analyzer.compute_pairwise_scores("scores", factors_name="ekfac", query_dataset=queries, train_dataset=docs,
                                         per_device_query_batch_size=QUERIES, per_device_train_batch_size=BATCH,
                                         score_args=KScoreArguments(damping_factor=None),  # 0.1 x mean Lambda
                                         overwrite_output_dir=True)
        return analyzer.load_pairwise_scores("scores")["all_modules"]

    return fit, score


def freeze_kronfluence_gc(frozen: bool, saved: dict) -> None:
    """Kronfluence's release_memory (gc.collect + torch.compiler.reset after each stage) as installed,
    or a no-op, in every module that imported it."""
    for name, module in list(sys.modules.items()):
        if name.startswith("kronfluence") and hasattr(module, "release_memory"):
            saved.setdefault(name, module.release_memory)
            module.release_memory = (lambda: None) if frozen else saved[name]


# -- measuring ------------------------------------------------------------------------------------
def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    a, b = ours.double().flatten().numpy(), theirs.double().flatten().numpy()
    return {"spearman": float(spearmanr(a, b).statistic), "pearson": float(pearsonr(a, b).statistic),
            "relative error": float(np.linalg.norm(a - b) / np.linalg.norm(b))}


def run_size(size: Size, args) -> list[tuple[str, str]]:
    docs_n = args.docs or size.docs
    model = build_model(size, args.seed)
    docs, queries = make_documents(model, size, docs_n, args.seed), make_queries(size, args.seed)
    tracked = [layer.name for layer in find_tracked_layers(model)]
    rows = [("job", f"{size.name}: {docs_n} documents x {size.seq_len} tokens, {QUERIES} queries, "
                    f"{len(tracked)} tracked layers, batch {BATCH}")]

    fit_s, factors = timed(lambda: engine_fit(model, docs), args.repeats)
    score_s, ours = timed(lambda: engine_scores(model, factors, docs, queries), args.repeats)
    rows += [("engine: fit (s)", f"{fit_s:.2f}"), ("engine: scoring (s)", f"{score_s:.2f}")]

    saved: dict = {}
    theirs = None
    for setting in ("as installed", "gc frozen"):
        k_fit, k_score = kronfluence_job(model, docs, queries, tracked)
        freeze_kronfluence_gc(setting == "gc frozen", saved)
        k_fit_s, _ = timed(k_fit, args.repeats)
        k_score_s, theirs = timed(k_score, args.repeats)
        rows += [(f"Kronfluence {setting}: fit (s)", f"{k_fit_s:.2f}"),
                 (f"Kronfluence {setting}: scoring (s)", f"{k_score_s:.2f}"),
                 (f"ratio engine / Kronfluence {setting}: fit", f"{fit_s / k_fit_s:.2f}"),
                 (f"ratio engine / Kronfluence {setting}: scoring", f"{score_s / k_score_s:.2f}")]
    freeze_kronfluence_gc(False, saved)
    rows += [(f"agreement: {k}", f"{v:.6g}" if k == "relative error" else f"{v:.4f}")
             for k, v in agreement(ours, theirs.to(ours)).items()]
    return rows


def kronfluence_installed() -> bool:
    return importlib.util.find_spec("kronfluence") is not None


def main(argv=None) -> int:
    args = parse_args(argv)
    if not kronfluence_installed():
        print("vs_kronfluence: Kronfluence is not installed; `pip install --no-deps kronfluence accelerate einconv "
              "einops opt_einsum` (its own requirements pull another torch build)")
        return 0
    torch.set_num_threads(1)
    import kronfluence

    print(f"engine vs Kronfluence {kronfluence.__version__}; torch {torch.__version__}, 1 thread, CPU; "
          f"medians of {args.repeats}; summed losses, Fisher of the mean over sequences, damping 0.1 x mean "
          "Lambda per layer, shared sampled labels, positive = raises the query's log-likelihood")
    for name in args.sizes:
        rows = run_size(SIZES[name], args)
        width = max(len(k) for k, _ in rows)
        print()
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How fast is the engine compared with plain training? One run, one table.

Builds a tiny-but-not-trivial GPT-NeoX from a config (nothing is downloaded), makes a few hundred
right-padded random-token documents, and measures over exactly the same batches:

  (i)   plain training forward + backward (loss.backward() into every parameter): docs/s, tokens/s
  (ii)  fit_factors wall time for EK-FAC (covariance + correction passes), K-FAC and diagonal,
        as a multiple of one forward+backward epoch            goal: EK-FAC <= 2.5x
  (iii) score_documents throughput for 1 and for 16 multi-stage queries,
        as a fraction of forward+backward throughput          goal: >= 0.9x
  (iv)  attribute_tokens throughput (per-token heatmaps) for 1 and 16 queries

Each timing is the best of ``--repeats`` runs after a warm-up; forward+backward is timed at the start
and again at the end and the faster is the reference. ``torch`` keeps its default thread count unless
``--threads`` is given. On a shared, busy machine wall-clock times are noisy (and several torch
threads competing with other processes for few cores can be many times slower): there, use
``--threads 1 --clock cpu``, which times the process's own CPU seconds. ``--profile`` adds cProfile
breakdowns of the EK-FAC fit, of scoring and of the plain training step.

    python benchmarks/engine_speed.py                            # ~1-3 minutes on a 2-core CPU
    python benchmarks/engine_speed.py --quick                    # ~10 s smoke run
    python benchmarks/engine_speed.py --threads 1 --clock cpu    # busy machine
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import sys
import time
from collections.abc import Callable

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from engine import (
    FactorArguments,
    LanguageModelingTask,
    ScoreArguments,
    attribute_tokens,
    find_tracked_layers,
    fit_factors,
    precondition,
    score_documents,
    sequence_gradients,
)
from engine.gradients import capture
from engine.tasks import IGNORE

FIT_GOAL = 2.5  # EK-FAC fit time / one forward+backward epoch, at most
SCORE_GOAL = 0.9  # scoring throughput / forward+backward throughput, at least


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=128, help="hidden size (MLP is 4x)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--vocab", type=int, default=2048, help="vocabulary size")
    p.add_argument("--seq-len", type=int, default=128, help="longest document (tokens)")
    p.add_argument("--docs", type=int, default=256, help="documents (fitting and scoring data)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--queries", type=int, default=16, help="query count of the multi-query runs")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (best kept)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; unset keeps torch's default")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed seconds; cpu: this process's CPU seconds (use with --threads 1)")
    p.add_argument("--seed", type=int, default=0, help="model and data seed")
    p.add_argument("--quick", action="store_true", help="small model and data: a smoke run")
    p.add_argument("--profile", action="store_true", help="print cProfile breakdowns")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.heads, args.vocab = 64, 2, 2, 512
        args.seq_len, args.docs, args.queries, args.repeats = 64, 48, 4, 1
    return args


# ----------------------------------------------------------------------------------------------
# model and data


def build_model(args) -> GPTNeoXForCausalLM:
    torch.manual_seed(args.seed)
    config = GPTNeoXConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
        max_position_embeddings=max(args.seq_len, 64), rotary_pct=0.25, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return GPTNeoXForCausalLM(config).eval()


def make_batches(n_docs: int, seq_len: int, vocab: int, batch_size: int, seed: int,
                 min_len: int | None = None) -> list[dict]:
    """Right-padded random-token documents of lengths in [seq_len / 2, seq_len]."""
    g = torch.Generator().manual_seed(seed)
    min_len = min_len or max(2, seq_len // 2)
    lengths = torch.randint(min_len, seq_len + 1, (n_docs,), generator=g)
    batches = []
    for start in range(0, n_docs, batch_size):
        lens = lengths[start:start + batch_size]
        width = int(lens.max())
        ids = torch.randint(1, vocab, (len(lens), width), generator=g)
        mask = (torch.arange(width)[None, :] < lens[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
        batches.append({"input_ids": ids, "attention_mask": mask,
                        "labels": ids.masked_fill(mask == 0, IGNORE)})
    return batches


def make_queries(n: int, vocab: int, seed: int) -> dict:
    """Prompt + answer rows: 24 prompt tokens (unscored), 8 answer tokens (scored)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, 32), generator=g)
    labels = ids.clone()
    labels[:, :24] = IGNORE
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


# ----------------------------------------------------------------------------------------------
# timing


CLOCK = time.perf_counter


def best_of(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        best = min(best, CLOCK() - t0)
    return best


def forward_backward_epoch(model, task, batches) -> None:
    """What training costs: the same summed loss, backward into every parameter."""
    for batch in batches:
        model.zero_grad(set_to_none=True)
        task.sequence_losses(model, batch).sum().backward()
    model.zero_grad(set_to_none=True)


def capture_epoch(model, task, batches, layers) -> None:
    """The engine's shared first step: forward + backward to tracked-layer outputs only."""
    for batch in batches:
        capture(model, task, batch, layers)


def attribute_epoch(model, task, batches, layers, query) -> None:
    for batch in batches:
        attribute_tokens(model, task, batch, layers, query)


def rescale(rows, old_fb: float, new_fb: float, n_docs: int, n_tokens: int) -> list:
    """Recompute ratios (and goal checks) of ``rows`` against a new forward+backward time."""
    out = []
    for label, sec, dps, tps, ratio, goal, met in rows:
        if label.startswith("forward+backward"):
            sec, dps, tps = new_fb, n_docs / new_fb, n_tokens / new_fb
        elif ratio.endswith("time"):
            ratio = f"{sec / new_fb:.2f}x time"
            met = None if met is None else sec / new_fb <= FIT_GOAL
        elif ratio.endswith("thru"):
            ratio = f"{new_fb / sec:.2f}x thru"
            met = None if met is None else new_fb / sec >= SCORE_GOAL
        out.append((label, sec, dps, tps, ratio, goal, met))
    return out


def profile(label: str, fn: Callable[[], object], top: int = 22) -> None:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).strip_dirs().sort_stats("tottime")
    stats.print_stats(top)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    print(f"\n--- cProfile: {label} (sorted by own time) ---")
    print("\n".join(line for line in lines[start - 2:] if line.strip()))


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    global CLOCK
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(args.seed)
    task = LanguageModelingTask()
    model = build_model(args)
    layers = find_tracked_layers(model)
    batches = make_batches(args.docs, args.seq_len, args.vocab, args.batch_size, args.seed + 1)
    n_docs = sum(b["input_ids"].shape[0] for b in batches)
    n_tokens = int(sum(b["attention_mask"].sum() for b in batches))
    n_padded = sum(b["input_ids"].numel() for b in batches)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    n_tracked = sum(p.numel() for layer in layers for p in layer.module.parameters(recurse=False))

    print("MSIF engine speed benchmark")
    print(f"  torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.2f} at start, "
          f"{'wall-clock' if args.clock == 'wall' else 'process CPU'} seconds")
    if args.clock == "wall" and os.getloadavg()[0] >= (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        print("  note: the machine looks busy (load >= CPUs); for stable numbers try --threads 1 --clock cpu")
    if args.clock == "cpu" and torch.get_num_threads() > 1:
        print("  note: --clock cpu with several threads counts every thread's time (spin-waits too)")
    print(f"  model: GPTNeoXForCausalLM hidden={cfg.hidden_size} layers={cfg.num_hidden_layers} "
          f"heads={cfg.num_attention_heads} intermediate={cfg.intermediate_size} vocab={cfg.vocab_size} "
          f"({cfg._attn_implementation} attention, float32)")
    print(f"  parameters: {n_params:,} total, {n_tracked:,} in {len(layers)} tracked layers")
    print(f"  data: {n_docs} random-token documents, {n_tokens:,} tokens ({n_padded:,} with padding), "
          f"length {args.seq_len // 2}-{args.seq_len}, batch size {args.batch_size}, "
          f"{len(batches)} batches; best of {args.repeats} timed run(s) after warm-up")
    sys.stdout.flush()

    # warm-up: every code path once on two batches
    warm = batches[:2]
    forward_backward_epoch(model, task, warm)
    capture_epoch(model, task, warm, layers)
    warm_factors = fit_factors(model, task, warm, layers, FactorArguments(progress=False))
    q_batch = make_queries(args.queries, args.vocab, args.seed + 2)
    q_grads = sequence_gradients(model, task, q_batch, layers)
    warm_query = precondition(q_grads, ScoreArguments(method="multi-stage", alpha=1.0), warm_factors, warm_factors)
    score_documents(model, task, warm, layers, warm_query, progress=False)
    attribute_epoch(model, task, warm, layers, warm_query)

    rows = []  # (label, seconds, docs/s, tokens/s, ratio text, goal text, met)

    def record(label, seconds, ratio="", goal="", met=None):
        rows.append((label, seconds, n_docs / seconds, n_tokens / seconds, ratio, goal, met))
        print(f"  measured {label}: {seconds:.2f} s", flush=True)

    # (i) plain training step
    t_fb = t_fb_start = best_of(lambda: forward_backward_epoch(model, task, batches), args.repeats)
    record("forward+backward (training)", t_fb, "1.00x", "reference")
    t_cap = best_of(lambda: capture_epoch(model, task, batches, layers), args.repeats)
    record("engine capture (fwd + bwd to layer outputs)", t_cap, f"{t_cap / t_fb:.2f}x time")

    # (ii) factor fits
    fitted = {}
    for strategy in ("ekfac", "kfac", "diagonal"):
        fa = FactorArguments(strategy=strategy, progress=False)
        t = best_of(lambda: fitted.__setitem__(strategy, fit_factors(model, task, batches, layers, fa)),
                    args.repeats)
        ratio = t / t_fb
        if strategy == "ekfac":
            record("fit_factors ekfac (2 passes)", t, f"{ratio:.2f}x time", f"<= {FIT_GOAL:g}x", ratio <= FIT_GOAL)
        else:
            passes = "1 pass"
            record(f"fit_factors {strategy} ({passes})", t, f"{ratio:.2f}x time")

    # (iii) scoring; the query is preconditioned once (its cost is reported separately)
    factors = fitted["ekfac"]
    sargs = ScoreArguments(method="multi-stage", alpha=1.0)
    t_pre = best_of(lambda: precondition(q_grads, sargs, factors, factors), args.repeats)
    query = precondition(q_grads, sargs, factors, factors)
    for nq in (1, args.queries):
        qsel = query.select(slice(0, nq))
        t = best_of(lambda: score_documents(model, task, batches, layers, qsel, progress=False), args.repeats)
        ratio = t_fb / t
        record(f"score_documents, {nq} quer{'y' if nq == 1 else 'ies'}", t, f"{ratio:.2f}x thru",
               f">= {SCORE_GOAL:g}x", ratio >= SCORE_GOAL)

    # (iv) token attribution
    for nq in (1, args.queries):
        qsel = query.select(slice(0, nq))
        t = best_of(lambda: attribute_epoch(model, task, batches, layers, qsel), args.repeats)
        record(f"attribute_tokens, {nq} quer{'y' if nq == 1 else 'ies'}", t, f"{t_fb / t:.2f}x thru")

    t_fb_end = best_of(lambda: forward_backward_epoch(model, task, batches), args.repeats)
    if t_fb_end < t_fb_start:  # the machine got quieter: the faster reference makes ratios stricter
        print(f"  forward+backward again at the end: {t_fb_end:.2f} s (start {t_fb_start:.2f} s); "
              "ratios use the faster")
        rows = rescale(rows, t_fb_start, t_fb_end, n_docs, n_tokens)
    else:
        print(f"  forward+backward again at the end: {t_fb_end:.2f} s (start {t_fb_start:.2f} s)")

    # table
    print(f"\nResults ({n_docs} docs, {n_tokens:,} tokens; load average {os.getloadavg()[0]:.2f} at end)")
    head = f"{'measurement':<44} {'time s':>8} {'docs/s':>9} {'tokens/s':>10}  {'vs f+b':>11}  {'goal':>9}  met"
    print(head)
    print("-" * len(head))
    for label, sec, dps, tps, ratio, goal, met in rows:
        flag = "" if met is None else ("yes" if met else "NO")
        print(f"{label:<44} {sec:>8.2f} {dps:>9.1f} {tps:>10,.0f}  {ratio:>11}  {goal:>9}  {flag}")
    print(f"precondition multi-stage, {args.queries} queries (both inverses): {t_pre * 1e3:.1f} ms "
          f"({t_pre * 1e3 / args.queries:.2f} ms/query)")
    print("'x time' = seconds / forward+backward seconds (lower is better); "
          "'x thru' = docs/s / forward+backward docs/s (higher is better)")
    missed = [r[0] for r in rows if r[6] is False]
    print("all goals met" if not missed else f"goals missed: {', '.join(missed)}")
    if args.quick:
        print("(--quick is a smoke run: with this little data the fixed eigendecomposition cost "
              "dominates the fit ratios)")

    if args.profile:
        few = batches[: max(2, len(batches) // 4)]
        profile(f"fit_factors ekfac over {len(few)} batches",
                lambda: fit_factors(model, task, few, layers, FactorArguments(progress=False)))
        profile(f"score_documents, {args.queries} queries, over {len(few)} batches",
                lambda: score_documents(model, task, few, layers, query, progress=False))
        profile(f"forward+backward over {len(few)} batches",
                lambda: forward_backward_epoch(model, task, few))
    return 0


if __name__ == "__main__":
    sys.exit(main())

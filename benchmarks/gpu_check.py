"""One prepared run on a CUDA machine (no hub access needed), in under 8 minutes on one H200.

(a) The tiny demo pipeline on the CPU and on CUDA (two builds of the same seed): the factors and
    the exact multi-stage scores of the same questions, relative error printed.
(b) A Pythia-2.8B-shaped pretrained / fine-tuned pair built from its config with random weights
    in bfloat16: factors fitted on a few hundred generated documents and records, a few thousand
    documents projected, 3 queries answered by the explorer's query path with both factor sets held
    in bfloat16 (``factor_precision``, as the paper's config serves them); per stage and per query
    the peak GPU memory and time measured against `msif plan`'s prediction.

    python benchmarks/gpu_check.py                  # on the GPU machine
    python benchmarks/gpu_check.py --smoke          # seconds, CPU: the same code on tiny shapes (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_plan import write_inputs  # noqa: E402  (a sibling benchmark script)

GIB = 2**30


def _run(command: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def tiny_cpu_vs_cuda(root: Path, cuda: bool) -> dict:
    """Part (a): the tiny demo built on the CPU and on the default device; scores compared."""
    from engine import Factors
    from engine.study import layout
    from explorer.tracer import Tracer

    build = [sys.executable, "-m", "precompute", "build-demo", "--tiny", "--quiet", "--seed", "3", "--out"]
    _run(build + [str(root / "cpu")], {"CUDA_VISIBLE_DEVICES": ""})
    _run(build + [str(root / "gpu")])
    errors = {}
    for artifact in (layout.PT_FACTORS, layout.FT_FACTORS):
        a, b = (Factors.load(root / side / artifact.path) for side in ("cpu", "gpu"))
        lam = [(a.layers[n].corrected_eigenvalues.double(), b.layers[n].corrected_eigenvalues.double())
               for n in a.layers]
        errors[f"{artifact.stage}: Lambda, max |error| / layer max"] = max(
            float((x - y).abs().max() / x.abs().max()) for x, y in lam)
    facts = (root / "cpu" / layout.FACTS.path).read_text().splitlines()
    questions = [json.loads(line)["question"] for line in facts][:3]
    on_cpu = Tracer.open(root / "cpu", device="cpu")
    on_gpu = Tracer.open(root / "gpu", device="cuda" if cuda else "cpu")
    worst = 0.0
    for question in questions:
        answer = on_cpu.generate(question) or "It is."
        a, b = (t.trace(question, answer, top_k=10, heatmaps=False, exhaustive=True) for t in (on_cpu, on_gpu))
        sa, sb = np.array(a.pool_scores), np.array(b.pool_scores)
        worst = max(worst, float(np.abs(sa - sb).max() / np.abs(sa).max()))
    errors["multi-stage scores of every document, max |error| / max |score|"] = worst
    return errors


def large_shape(root: Path, shape: str, documents: int, factor_documents: int, records: int, max_length: int,
                batch_size: int, device: str, include: str = "") -> list[tuple]:
    """Part (b): a random-weight model of ``shape`` through the real pipeline and 3 queries;
    ``include`` limits the tracked layers (the float64 eigendecompositions of all 128 layers of a
    2.8B model take about 10 minutes per stage on one GPU, beyond this check's budget)."""
    from engine.plan import plan_study
    from engine.study import StudyConfig
    from explorer.tracer import Tracer

    dtype = "bfloat16" if device == "cuda" else "float32"
    started = time.perf_counter()
    toml = write_inputs(shape, root, documents, records, max_length, dtype=dtype, device=device,
                        batch_size=batch_size, factor_documents=factor_documents, include=include,
                        factor_precision="bfloat16")  # the paper's config serves its factors in bfloat16
    inputs_s = time.perf_counter() - started
    study = root / "study"
    _run([sys.executable, "-m", "precompute", "precompute", "--config", str(toml), "--out", str(study), "--quiet"])
    stages = json.loads((study / "manifest.json").read_text())["stages"]
    plan = plan_study(StudyConfig.from_toml(toml), device="h200" if device == "cuda" else "cpu",
                      documents=documents, records=records)
    rows = [("inputs (random weights, saved)", inputs_s, None, None)]
    for stage in plan.stages:
        usage = stages.get(stage.name, {}).get("usage")
        if usage:
            measured = usage["peak_device_bytes"] if device == "cuda" else usage["peak_host_bytes"]
            rows.append((stage.name, usage["seconds"], measured, stage.device_bytes))
    started = time.perf_counter()
    tracer = Tracer.open(study, device=device)
    open_s = time.perf_counter() - started
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for i in range(3):
        tracer.trace(f"w{i} w{i + 1} w{i + 2} ?", f"w{i + 3} w{i + 4} .", top_k=10)
    query_s = (time.perf_counter() - started) / 3
    serve = torch.cuda.max_memory_allocated() if device == "cuda" else None
    rows.append(("open the study (explorer)", open_s, None, None))
    layer = next(iter(tracer.study.pretrained.factors.layers.values()))
    held = {str(t.dtype).removeprefix("torch.") for t in vars(layer).values()
            if torch.is_tensor(t) and t.is_floating_point()}
    rows.append((f"per query (3, typed answers; factors held in {', '.join(sorted(held))})", query_s, serve,
                 next(s.device_bytes for s in plan.stages if s.name.startswith("serve"))))
    return rows


def table(rows: list[tuple]) -> str:
    lines = ["| step | seconds | peak memory GiB | planned GiB | measured / planned |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, seconds, measured, planned in rows:
        ratio = f"{measured / planned:.2f}" if measured and planned else ""
        lines.append(f"| {name} | {seconds:.1f} | {measured / GIB if measured else 0:.2f} | "
                     f"{planned / GIB if planned else 0:.2f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, seconds (CI)")
    parser.add_argument("--keep", type=Path, help="keep the studies here")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device here: run with --smoke for the CPU check, or on a GPU machine")
        return 1
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        print(f"device: {torch.cuda.get_device_name(0) if cuda else 'cpu'}; torch {torch.__version__}", flush=True)
        errors = tiny_cpu_vs_cuda(root / "tiny", cuda and not args.smoke)
        print("\n(a) tiny demo, CPU vs " + ("CUDA" if cuda and not args.smoke else "CPU (smoke)"))
        for name, value in errors.items():
            print(f"  {name}: {value:.2e}")
        if args.smoke:
            rows = large_shape(root / "large", "pythia-14m", 24, 16, 8, 64, 8, "cpu", include=r"\.[0-3]\.")
        else:
            # all 32 blocks run; the tracked layers are those of blocks 0-3 (16 of 128)
            rows = large_shape(root / "large", "pythia-2.8b", 2000, 200, 100, 256, 8, "cuda", include=r"\.[0-3]\.")
        large = ("pythia-14m (smoke, CPU)" if args.smoke else
                 "pythia-2.8b shape, bfloat16, random weights, the layers of blocks 0-3 tracked")
        print(f"\n(b) {large}")
        print(table(rows))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

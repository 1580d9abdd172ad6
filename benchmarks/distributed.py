"""The pipeline's stages on the demo with torchrun: 2 processes x 1 thread against 1 process x 2 threads.

Copies the demo study's world, tokenizer and models (its first five stages) into two fresh
directories and runs `msif build-demo` there, which then runs only the pipeline (factors of both
stages, projection, index): once as one process with 2 torch threads, once as `--nproc 2` with
1 thread per process (gloo). Prints each stage's wall time (rank 0's), the total, the ratio, and
how far the two studies' factors and scores are apart (thread counts change float reductions).

    python benchmarks/distributed.py [--study studies/demo]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine import Factors
from engine.study import DEFAULT_STUDY, Study, layout

KEEP = layout.DEMO_STAGES


def seed_study(source: Path, target: Path) -> None:
    """A study holding only the demo's own stages of ``source`` (the pipeline is then rerun)."""
    manifest = Study(source).manifest()
    keep = {f for s in KEEP for f in manifest["stages"][s]["files"]}
    for rel in keep:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, target / rel)
    manifest["stages"] = {s: manifest["stages"][s] for s in KEEP}
    manifest["files"] = {f: rec for f, rec in manifest["files"].items() if f in keep}
    (target / layout.MANIFEST.path).write_text(json.dumps(manifest, indent=2) + "\n")


def run(study: Path, nproc: int, threads: int) -> float:
    started = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-m", "precompute", "build-demo", "--out", str(study), "--quiet",
                           "--nproc", str(nproc)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"build failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, default=Path(DEFAULT_STUDY))
    args = parser.parse_args(argv)
    if Study(args.study).manifest().get("demo", {}).get("seed", 0) != 0:
        raise SystemExit("this benchmark reruns the default demo (seed 0): give a seed-0 demo study")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"1 process x 2 threads": (Path(tmp) / "one", 1, 2), "2 processes x 1 thread": (Path(tmp) / "two", 2, 1)}
        totals, stages = {}, {}
        for label, (study, nproc, threads) in runs.items():
            seed_study(args.study, study)
            totals[label] = run(study, nproc, threads)
            stages[label] = {s: info["usage"]["seconds"] for s, info in Study(study).manifest()["stages"].items()
                             if s in layout.PIPELINE_STAGES}
        one, two = (Study(runs[label][0]) for label in runs)
        worst = 0.0
        for artifact in (layout.PT_FACTORS, layout.FT_FACTORS):
            a, b = Factors.load(one.path(artifact)), Factors.load(two.path(artifact))
            for name in a.layers:
                x, y = a.layers[name].corrected_eigenvalues.double(), b.layers[name].corrected_eigenvalues.double()
                worst = max(worst, float((x - y).abs().max() / x.abs().max()))
    labels = list(runs)
    print(f"demo study {args.study}: the pipeline stages, rank 0's wall time per stage (s); torch {torch.__version__}")
    print(f"{'stage':<22}" + "".join(f"{label:>26}" for label in labels))
    for stage in layout.PIPELINE_STAGES:
        print(f"{stage:<22}" + "".join(f"{stages[label].get(stage, 0.0):>26.1f}" for label in labels))
    print(f"{'whole command':<22}" + "".join(f"{totals[label]:>26.1f}" for label in labels))
    print(f"\n2 x 1 thread / 1 x 2 threads, whole command: {totals[labels[1]] / totals[labels[0]]:.2f}")
    print(f"Lambda, largest difference between the two studies relative to the layer's largest: {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

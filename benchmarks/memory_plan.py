"""`msif plan` against reality: Pythia-shaped models with random weights through the real pipeline.

For each shape (assets/models/pythia-*: the configs of EleutherAI's Pythia suite; weights are
random, nothing comes from a hub) this builds a pretrained model, a "fine-tuned" child (the same
weights, perturbed), a word-level tokenizer, documents long enough to fill `max_length` and
dolly-style records, then runs `python -m precompute precompute` in a fresh process, which records
each stage's wall time and peak resident memory in the manifest. The plan is computed for the
same config on this machine (CPU) and the two are printed side by side:

    python benchmarks/memory_plan.py                         # pythia-14m, -70m, -160m shapes
    python benchmarks/memory_plan.py --shapes pythia-14m --documents 8

Target: predicted peak memory within 20% of the measured one for every stage and shape.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "assets" / "models"
WORDS = 6000  # distinct words of the generated corpus (a word-level tokenizer: one token each)


def write_inputs(shape: str, root: Path, documents: int, records: int, max_length: int, seed: int = 0,
                 dtype: str = "float32", device: str = "cpu", batch_size: int = 8, factor_documents: int = 0,
                 include: str = "", factor_precision: str = "float32") -> Path:
    """Models, tokenizer and data for ``shape`` under ``root``; returns the study config (TOML)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(WORDS)]
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", "#", ":", "\n", "?", "."] + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(SHAPES / shape)
    with torch.device(device):  # random initialisation where it is fast
        base = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    base.save_pretrained(root / "base")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    base.save_pretrained(root / "child")
    del base
    tokenizer.save_pretrained(root / "base")
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": text(max_length + 8), "title": f"d{i}"}) + "\n"
                                             for i in range(documents)))
    (root / "dolly.jsonl").write_text("".join(json.dumps({"instruction": text(12), "context": "",
                                                          "response": text(max_length // 2), "category": "open_qa"})
                                              + "\n" for _ in range(records)))
    toml = root / "study.toml"
    toml.write_text(f"""[models]
base = "{root / 'base'}"
finetuned = "{root / 'child'}"
tokenizer = "{root / 'base'}"
dtype = "{dtype}"
device = "{device}"

[pretraining]
path = "{root / 'docs.jsonl'}"
title_field = "title"

[finetuning]
path = "{root / 'dolly.jsonl'}"

[influence]
max_length = {max_length}
batch_size = {batch_size}
factor_documents = {factor_documents}
{f"include = [{json.dumps(include)}]" if include else ""}
label_samples = 1
projection_dim = 256
eigen_dim = 1024
factor_precision = "{factor_precision}"
""")
    return toml


def measure(toml: Path, out: Path, threads: int) -> dict[str, dict]:
    """Run the pipeline in a fresh process; each stage's recorded usage."""
    # A fixed mmap threshold turns off glibc's growing one, so that freed buffers leave the
    # process at once and resident memory follows what the code holds.
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_="131072")
    done = subprocess.run([sys.executable, "-m", "precompute", "precompute", "--config", str(toml), "--out", str(out),
                           "--quiet"], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"precompute failed:\n{done.stdout}\n{done.stderr}")
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    return {name: info["usage"] for name, info in stages.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["pythia-14m", "pythia-70m", "pythia-160m"])
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--records", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep the inputs and studies here")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    from engine.plan import plan_study
    from engine.study import StudyConfig

    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        rows = []
        for shape in args.shapes:
            root = base / shape
            root.mkdir(parents=True, exist_ok=True)
            toml = write_inputs(shape, root, args.documents, args.records, args.max_length)
            measured = measure(toml, root / "study", args.threads)
            plan = plan_study(StudyConfig.from_toml(toml), device="cpu", documents=args.documents,
                              records=args.records)
            for stage in plan.stages:  # on a CPU plan the compute device is the host
                if stage.name in measured:
                    got = measured[stage.name]["peak_host_bytes"]
                    rows.append((shape, stage.name, stage.device_bytes, got, measured[stage.name]["seconds"],
                                 stage.seconds))
        text = table(rows)
        print(text)
    if args.out:
        command = " ".join(["python benchmarks/memory_plan.py", *(argv if argv is not None else sys.argv[1:])])
        args.out.write_text(f"# msif plan against measured runs\n\n`{command}`: {args.documents} documents and "
                            f"{args.records} records of {args.max_length} tokens, batch_size 8, "
                            f"{args.threads} threads, on this machine's CPU. Peak = the stage's peak resident "
                            "memory, sampled every 10 ms.\n\n" + text + "\n")
    return 0


def table(rows) -> str:
    lines = ["| shape | stage | planned peak MiB | measured peak MiB | planned / measured | measured s | planned s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for shape, stage, planned, got, secs, planned_s in rows:
        lines.append(f"| {shape} | {stage} | {planned / 2**20:,.0f} | {got / 2**20:,.0f} | {planned / got:.2f} | "
                     f"{secs:.1f} | {planned_s:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

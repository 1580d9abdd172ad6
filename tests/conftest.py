"""Shared tiny models and data. Everything is built locally; nothing touches a model hub."""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from engine.tasks import IGNORE

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers (pytest-xdist) on what may be two cores: one thread each, for
    # torch, faiss and every build it starts, since oversubscribed OpenMP threads spin-wait and made
    # tests many times slower.
    import faiss

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)

# The longest modules first (whole modules go to one worker: `--dist loadfile`), so that the workers
# finish together; the rest in their usual order. The README test leads: its `make demo` builds the
# full demo study on one thread (about 17 minutes), the longest single piece of CI. xdist would sort
# modules by their number of tests instead, which put this two-test module near the end and CI's
# wall time at the build's plus most of the rest: `make test` passes --no-loadscope-reorder. The
# worker that takes the README module is handed one more module at once (xdist keeps more than two
# tests queued), which waits for the build: a quick one, test_paths.py, is third.
LONGEST = ("test_readme_commands.py", "test_integrity.py", "test_paths.py", "test_bench_quality.py", "test_plan.py",
           "test_ground_truth.py", "test_distributed.py", "test_haystack.py", "test_browser.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST.index(name) if name in LONGEST else len(LONGEST)

    items.sort(key=rank)  # stable: each module's tests keep their order

VOCAB = 24


def tiny_neox(seed: int = 0, hidden: int = 8, layers: int = 2) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=2, intermediate_size=2 * hidden,
                           max_position_embeddings=64)
    return GPTNeoXForCausalLM(config).double().eval()


def lm_batch(n: int, length: int, seed: int, ragged: bool = True, prompt: int = 0) -> dict:
    """Random token batch, right-padded when ``ragged``; the first ``prompt`` tokens unscored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    if ragged:
        for i in range(n):
            mask[i, length - (i % 3):] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :prompt] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def layer_weight_gradients(layers, loss) -> dict:
    """d loss / d W of each tracked layer from autograd, as (out, in[+1]) with the bias as a last
    column (the engine's layout): the brute-force reference of every gradient the engine forms."""
    params = [p for layer in layers for p in (layer.module.weight, layer.module.bias) if p is not None]
    grads = iter(torch.autograd.grad(loss, params, retain_graph=True))
    out = {}
    for layer in layers:
        w = next(grads)
        w = w.T if layer.transposed else w
        if layer.has_bias:
            w = torch.cat([w, next(grads)[:, None]], dim=1)
        out[layer.name] = w
    return out


@pytest.fixture(scope="module")
def pt_model():
    return tiny_neox(seed=0)


@pytest.fixture(scope="module")
def ft_model(pt_model):
    """A 'fine-tuned child': the parent's weights, moved."""
    child = copy.deepcopy(pt_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in child.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return child


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    spin-waiting made tests many times slower: one torch and one faiss thread for the rest of the
    module (``pytestmark = pytest.mark.usefixtures("one_thread")`` for all of it), restored after."""
    import faiss

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


@pytest.fixture(scope="session")
def tiny_builds(tmp_path_factory):
    """``tiny_builds(nproc)``: the tiny demo built as a user builds it (``python -m precompute
    build-demo`` in a subprocess, one OpenMP thread, ``nproc`` processes), once per session on first
    use and shared read-only: the references that killed, resumed and distributed builds must equal
    byte for byte."""
    import subprocess

    root, built = tmp_path_factory.mktemp("tiny-builds"), {}

    def build(nproc: int = 1) -> Path:
        if nproc not in built:
            out = root / f"nproc-{nproc}"
            done = subprocess.run([sys.executable, "-m", "precompute", "build-demo", "--out", str(out), "--tiny",
                                   "--quiet", "--seed", "3", "--nproc", str(nproc)],
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                                  timeout=900)
            assert done.returncode == 0, done.stdout + done.stderr
            built[nproc] = out
        return built[nproc]

    return build


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> Path:
    """A tiny demo study (seconds to build), built once through the CLI and shared read-only."""
    from precompute.cli import main

    out = tmp_path_factory.mktemp("tiny-demo") / "study"
    assert main(["build-demo", "--out", str(out), "--tiny", "--quiet", "--seed", "3"]) == 0
    return out


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """A script under benchmarks/ as a module (benchmarks/ is not a package). Registered in
    sys.modules first: dataclasses look their module up while the file executes."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # scripts import their siblings
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Benchmarks and some tests set torch's thread count; no test leaks it into the next."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)

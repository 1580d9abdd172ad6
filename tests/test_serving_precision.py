"""Both factor sets held in 16 bits while serving (`influence.factor_precision`): what the explorer and
the index stage hold, against float32 on a tiny study, and the checks around it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import Factors, precondition, sequence_gradients
from engine.query import TASK
from engine.study import StudyConfig, layout, open_study
from engine.text import encode_prompt_answer

from conftest import load_benchmark


def _preconditioned(opened, prompts, answers):
    batch = encode_prompt_answer(opened.tokenizer, [opened.prompts.prompt(p) for p in prompts], answers,
                                 opened.config.influence.max_length)
    grads = sequence_gradients(opened.finetuned.model, TASK, batch, opened.finetuned.layers)
    args = opened.config.influence.score_arguments("multi-stage")
    return precondition(grads, args, opened.pretrained.factors, opened.finetuned.factors).vectors


@pytest.mark.parametrize("precision, tolerance", [("bfloat16", 0.1), ("float16", 0.01)])
def test_factors_held_in_16_bits_precondition_as_float32(tiny_study, precision, tolerance):
    full = open_study(tiny_study, device="cpu", factor_precision="float32")
    held = open_study(tiny_study, device="cpu", factor_precision=precision)
    layer = next(iter(held.pretrained.factors.layers))
    stored = full.pretrained.factors.layers[layer]
    assert all(t.dtype == getattr(torch, precision) for t in vars(held.pretrained.factors.layers[layer]).values()
               if torch.is_tensor(t) and t.is_floating_point())
    assert all(t.dtype == torch.float32 for t in vars(stored).values() if torch.is_tensor(t) and t.is_floating_point())
    prompts, answers = ["Where does the first person live?", "Who runs it?"], ["In a town.", "Nobody."]
    ref, low = _preconditioned(full, prompts, answers), _preconditioned(held, prompts, answers)
    for name in ref:
        assert ref[name].dtype == low[name].dtype == torch.float32  # computed in float32 a layer at a time
        error = (ref[name] - low[name]).abs().max() / ref[name].abs().max()
        assert 0 < error < tolerance, (name, error.item())
    # the whitened coordinates kept are picked from the stored factors: the documents' and the queries' agree
    assert all(torch.equal(a, b) for a, b in zip(full.whitening.kept.values(), held.whitening.kept.values()))


def test_a_16_bit_study_reads_each_pretrained_factor_file_once(tiny_study, monkeypatch):
    """The whitening picks its coordinates from the stored float32 factors and the served 16-bit copy is
    made from the same read: opening and querying read every pretrained layer's file once."""
    import engine.factors as factors_module

    reads = []
    real = factors_module.StoredLayers._read
    monkeypatch.setattr(factors_module.StoredLayers, "_read",
                        lambda self, name: reads.append((self.directory.name, name)) or real(self, name))
    held = open_study(tiny_study, device="cpu", factor_precision="bfloat16")
    _preconditioned(held, ["Where does the first person live?"], ["In a town."])
    pretrained = [name for where, name in reads if where == layout.PT_FACTORS.path.split("/")[-1]]
    assert sorted(pretrained) == sorted(held.pretrained.factors.layers) and len(set(pretrained)) == len(pretrained)
    assert held.pretrained.factors.layers[pretrained[0]].corrected_eigenvalues.dtype == torch.bfloat16


def test_msif_query_serves_with_16_bit_factors(tiny_study, capsys):
    from explorer.cli import main as msif

    question = "Where does the first person live?"
    runs = {}
    for precision in ("float32", "bfloat16"):
        assert msif(["query", "--study", str(tiny_study), "--prompt", question, "--answer", "In a town.", "--json",
                     "--factor-precision", precision]) == 0
        runs[precision] = json.loads(capsys.readouterr().out.splitlines()[-1])
    full, half = ({h["doc_id"]: h["score"] for h in runs[p]["proponents"]} for p in ("float32", "bfloat16"))
    shared = sorted(set(full) & set(half))
    assert len(full) == len(half) > 0 and len(shared) >= 0.8 * len(full)  # near-ties may swap at the cut
    largest = max(abs(v) for v in full.values())
    assert np.allclose([full[d] for d in shared], [half[d] for d in shared], rtol=1e-2, atol=1e-3 * largest)


def test_float16_beyond_its_range_is_refused_not_inf(tiny_study, tmp_path):
    source = tiny_study / layout.PT_FACTORS.path
    copy = tmp_path / "factors"
    shutil.copytree(source, copy)
    factors = Factors.load(copy)
    layer = next(iter(factors.layers))
    path = copy / factors.layers.files[layer]
    tensors = load_file(str(path))
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key] = tensors[key] * 0 + 1e6  # past float16's 65504
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="range.*bfloat16"):
        Factors.load(copy, dtype=torch.float16).layers[layer]
    assert torch.isfinite(vars(Factors.load(copy, dtype=torch.bfloat16).layers[layer])[key]).all()


def test_factor_precision_is_checked():
    with pytest.raises(ValueError, match="factor_precision must be one of float32, bfloat16, float16"):
        StudyConfig.from_dict({"models": {"base": "a", "finetuned": "b"}, "pretraining": {"path": "p"},
                               "finetuning": {"path": "f"}, "influence": {"factor_precision": "int8"}}).validate()


@pytest.mark.slow
def test_serving_precision_benchmark_smoke(tiny_study, tmp_path):
    bench = load_benchmark("serving_precision")
    out = tmp_path / "precision.md"
    assert bench.main(["--study", str(tiny_study), "--questions", "3", "--shape", "pythia-14m", "--documents", "8",
                       "--length", "16", "--threads", "1", "--out", str(out)]) == 0
    rows = [line.split("|") for line in out.read_text().splitlines()
            if line.startswith("| ") and line.split("|")[3].strip() in ("none", "gradient", "gradient^0.5")]
    truncated = [row for row in rows if "eigenvectors" in row[2]]
    assert len(rows) - len(truncated) == 2 * 2 * 3  # two settings, two precisions, three rankings
    assert len(truncated) == 2 * 2 * 3  # two settings, two truncations, three rankings
    for row in rows:
        error, spearman, overlap = float(row[4]), float(row[5]), float(row[6])
        assert 0 <= overlap <= 1 and -1 <= spearman <= 1 and error > 0
        if row not in truncated:
            assert error < 0.05 and spearman > 0.95

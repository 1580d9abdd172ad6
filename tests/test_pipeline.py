"""`msif precompute` end to end with tiny models saved locally and local data files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from engine import Factors, find_tracked_layers
from precompute.config import StudyConfig
from precompute.pipeline import run_pipeline
from precompute.study import Study, StudyError

DOCS = [f"the {c} fox number {i} jumps over the {d} dog" for i, (c, d) in
        enumerate([("red", "lazy"), ("blue", "old"), ("green", "sleepy"), ("brown", "happy")] * 3)]
RECORDS = [{"instruction": f"What colour is fox {i}?", "context": "", "response": f"The fox is {c}.",
            "category": cat} for i, (c, cat) in enumerate([("red", "open_qa"), ("blue", "closed_qa"),
                                                           ("green", "brainstorming")] * 2)]


def _tokenizer(texts):
    words = sorted({w for t in texts for w in t.replace("?", " ? ").replace(".", " . ").split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", "#", ":", "\n"] + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    tok = _tokenizer(DOCS + [r["instruction"] + " " + r["response"] for r in RECORDS])
    config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32, max_position_embeddings=128)
    base = GPTNeoXForCausalLM(config)
    child = copy.deepcopy(base)
    with torch.no_grad():
        for p in child.parameters():
            p.add_(0.01 * torch.randn_like(p))
    for name, model in (("base", base), ("child", child)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t, "title": f"doc {i}"}) + "\n"
                                             for i, t in enumerate(DOCS)))
    (root / "dolly.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return root


def _config(inputs, **influence):
    return StudyConfig.from_dict({
        "models": {"base": str(inputs / "base"), "finetuned": str(inputs / "child"), "device": "cpu"},
        "pretraining": {"path": str(inputs / "docs.jsonl"), "title_field": "title"},
        "finetuning": {"path": str(inputs / "dolly.jsonl")},
        "template": "### Instruction:\n{instruction}\n\n### Response:\n",
        "influence": {"alpha": 2.0, "batch_size": 4, "max_length": 32, **influence},
    })


def test_pipeline_builds_a_verifiable_study(inputs, tmp_path):
    study = run_pipeline(_config(inputs), tmp_path / "study", progress=False)
    manifest = study.verify(["corpus", "finetune-data", "factors-pretrained", "factors-finetuned"],
                            checksums=True)
    assert manifest["config"]["influence"]["alpha"] == 2.0
    assert "factors/pretrained.safetensors" in manifest["files"]
    pt = Factors.load(study.path("factors/pretrained.safetensors"))
    ft = Factors.load(study.path("factors/finetuned.safetensors"))
    assert pt.num_sequences == len(DOCS) and ft.num_sequences == len(RECORDS)
    base = GPTNeoXForCausalLM.from_pretrained(inputs / "base")
    pt.check_compatible(base, find_tracked_layers(base))
    assert pt.model["weights_sha256"] != ft.model["weights_sha256"]


def test_pipeline_resumes_and_reruns_changed_stages(inputs, tmp_path):
    out = tmp_path / "study"
    run_pipeline(_config(inputs), out, progress=False)
    stages = Study(out).manifest()["stages"]
    run_pipeline(_config(inputs), out, progress=False)  # nothing to do: every stage is kept
    assert Study(out).manifest()["stages"] == stages
    run_pipeline(_config(inputs, label_samples=2), out, progress=False)  # factors refit, corpus kept
    again = Study(out).manifest()["stages"]
    assert again["corpus"] == stages["corpus"]
    assert again["factors-pretrained"]["finished"] >= stages["factors-pretrained"]["finished"]
    assert again["factors-pretrained"]["config"] != stages["factors-pretrained"]["config"]


def test_tampered_or_missing_study_is_reported(inputs, tmp_path):
    with pytest.raises(StudyError, match="no study"):
        Study(tmp_path / "nowhere").verify(["corpus"])
    study = run_pipeline(_config(inputs), tmp_path / "study", progress=False)
    with open(study.path("factors/finetuned.safetensors"), "ab") as f:
        f.write(b"x")
    with pytest.raises(StudyError, match="changed after the study was built"):
        study.verify(["corpus"])
    with pytest.raises(StudyError, match="missing stages: index"):
        study.verify(["index"])


def test_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[models]\nbase = 'x'\n")
    with pytest.raises(ValueError, match="needs both"):
        StudyConfig.from_toml(bad)
    bad.write_text("[modles]\n")
    with pytest.raises(ValueError, match="unknown key"):
        StudyConfig.from_toml(bad)
    with pytest.raises(ValueError, match="does not exist"):
        StudyConfig.from_toml(tmp_path / "missing.toml")

"""`msif precompute` end to end with tiny models saved locally and local data files."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from engine import Factors, find_tracked_layers
from engine.study import Stage, Study, StudyConfig, StudyError, layout
from precompute.pipeline import run_pipeline

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
    manifest = study.verify(layout.PIPELINE_STAGES)
    assert manifest["config"]["influence"]["alpha"] == 2.0
    assert f"{layout.PT_FACTORS}/index.json" in manifest["files"]
    pt = Factors.load(study.path(layout.PT_FACTORS))
    ft = Factors.load(study.path(layout.FT_FACTORS))
    assert pt.num_sequences == len(DOCS) and ft.num_sequences == len(RECORDS)
    base = GPTNeoXForCausalLM.from_pretrained(inputs / "base")
    pt.check_compatible(base, find_tracked_layers(base))
    assert pt.model["weights_sha256"] != ft.model["weights_sha256"]
    vectors = np.concatenate(list(_vectors(study).chunks("raw")))
    assert vectors.shape[0] == len(DOCS) and np.isfinite(vectors).all()
    assert manifest["stages"][layout.Stage.INDEX]["search"]["kind"] == "flat"  # small: an exhaustive scan
    stored = np.load(study.path(layout.shard_file(0, "whitened")), mmap_mode="r")  # memory-mapped, float16
    assert isinstance(stored, np.memmap) and stored.dtype == np.float16 and stored.shape[0] == len(DOCS)


def _vectors(study: Study):
    from engine.study.vectors import DocumentVectors

    return DocumentVectors.of(study)


def test_projection_resumes_from_finished_shards(inputs, tmp_path, monkeypatch):
    import engine.projection
    import precompute.pipeline as pipeline

    monkeypatch.setattr(pipeline, "SHARD_SIZE", 4)
    calls = []
    real = engine.projection.capture  # one forward+backward per batch of documents

    def crash_on_third_shard(*args, **kwargs):  # one batch per shard here (shard 4, batch 4)
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.projection, "capture", crash_on_third_shard)
    out = tmp_path / "study"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(_config(inputs), out, progress=False)
    shards = Study(out).path(layout.SHARDS)
    assert sorted(p.name for p in shards.glob("shard-*")) == ["shard-00000", "shard-00001"]
    assert not list(shards.rglob(".*tmp"))
    run_pipeline(_config(inputs), out, progress=False)
    assert len(calls) == 4  # shards 0 and 1 were kept; 2 was redone
    resumed = np.concatenate(list(_vectors(Study(out)).chunks("whitened")))
    fresh = run_pipeline(_config(inputs), tmp_path / "fresh", progress=False)
    np.testing.assert_array_equal(resumed, np.concatenate(list(_vectors(fresh).chunks("whitened"))))


def test_pipeline_resumes_and_reruns_changed_stages(inputs, tmp_path):
    out = tmp_path / "study"
    run_pipeline(_config(inputs), out, progress=False)
    stages = Study(out).manifest()["stages"]
    run_pipeline(_config(inputs), out, progress=False)  # nothing to do: every stage is kept
    assert Study(out).manifest()["stages"] == stages
    run_pipeline(_config(inputs, label_samples=2), out, progress=False)  # factors refit, corpus kept
    again = Study(out).manifest()["stages"]
    assert again[Stage.CORPUS] == stages[Stage.CORPUS]
    assert again[Stage.FACTORS_PRETRAINED]["finished"] >= stages[Stage.FACTORS_PRETRAINED]["finished"]
    assert again[Stage.FACTORS_PRETRAINED]["config"] != stages[Stage.FACTORS_PRETRAINED]["config"]


def test_tampered_or_missing_study_is_reported(inputs, tmp_path):
    with pytest.raises(StudyError, match="no study"):
        Study(tmp_path / "nowhere").verify([Stage.CORPUS])
    study = run_pipeline(_config(inputs), tmp_path / "study", progress=False)
    with pytest.raises(StudyError, match="missing stages: app-cache"):
        study.verify([Stage.INDEX, "app-cache"])
    with open(study.path(f"{layout.FT_FACTORS}/index.json"), "ab") as f:
        f.write(b"x")
    with pytest.raises(StudyError, match="changed after the study was built"):
        study.verify([Stage.CORPUS])


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


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
    # every eigen-coordinate kept in float32 (and a projection as large as the gradients): retrieval is exact
    return run_pipeline(_config(inputs, projection_dim=100_000, eigen_dim=100_000, vector_dtype="float32"),
                        tmp_path_factory.mktemp("built") / "study", progress=False)


@pytest.mark.parametrize("method", ["multi-stage", "pt-inverse-dropped", "single-stage", "gradient-dot",
                                    "gradient-cosine", "representation", "bm25"])
def test_query_cli_json(built, method, capsys):
    from explorer.cli import main

    assert main(["query", "--study", str(built.root), "--prompt", "What colour is fox 2?",
                 "--answer", "The fox is green.", "--method", method, "--top-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip())
    assert list(result)[:6] == ["prompt", "answer", "method", "scores", "proponents", "opponents"]
    assert result["scores"].startswith("similarity" if method in ("bm25", "representation") else "influence")
    assert result["answer"] == "The fox is green." and result["method"] == method
    pro, opp = result["proponents"], result["opponents"]
    assert len(pro) == len(opp) == 3
    def ranked_by(hit):  # a normalised ranking orders by the normalised score (same sign as the exact one)
        return hit["score"] if hit.get("normalized_score") is None else hit["normalized_score"]

    assert [ranked_by(h) for h in pro] == sorted((ranked_by(h) for h in pro), reverse=True)
    assert [ranked_by(h) for h in opp] == sorted(ranked_by(h) for h in opp)
    assert all(h["score"] > 0 for h in pro) and all(h["score"] < 0 for h in opp) or method in ("representation", "bm25")
    if method not in ("representation", "bm25"):
        for hit in pro + opp:  # token heatmaps sum to the exact score
            assert len(hit["tokens"]) == len(hit["token_scores"]) > 0
            assert sum(hit["token_scores"]) == pytest.approx(hit["score"], rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("method", ["multi-stage", "pt-inverse-dropped", "gradient-dot", "gradient-cosine"])
def test_every_indexed_method_is_served_by_the_whitened_vectors(built, method, monkeypatch):
    """All indexed methods search the whitened eigen-coordinates (<u, G> for any query u): with every
    coordinate kept, the index's 3 candidates per sign are the exact top 3 and its estimates are the
    exact scores (cosine: divided by the exact gradient norm)."""
    from dataclasses import replace

    from explorer.tracer import Tracer

    tracer = Tracer.open(built.root, device="cpu")
    assert tracer.study.index.record.get("projected") is None
    monkeypatch.setattr(tracer.study.config, "influence", replace(tracer.study.config.influence, candidates=3))
    args = ("What colour is fox 2?", "The fox is green.", method)
    served = tracer.trace(*args, top_k=3, heatmaps=False, normalization="none")
    exhaustive = tracer.trace(*args, top_k=3, exhaustive=True, heatmaps=False, normalization="none")
    assert "index candidates" in served.settings.retrieval
    for got, want in ((served.proponents, exhaustive.proponents), (served.opponents, exhaustive.opponents)):
        assert [h.doc_id for h in got] == [h.doc_id for h in want] and len(got) > 0
        for a, b in zip(got, want):
            assert a.score == pytest.approx(b.score, rel=1e-6)
            assert a.projected_score == pytest.approx(b.score, rel=1e-3)


def test_a_study_stored_in_int4_holds_the_float32_rows_to_half_a_step(built, inputs, tmp_path):
    """vector_dtype int4: the whitened rows of the same documents within half a quantisation step of
    the float32 build's, the shard bytes as the plan counts them, and queries still served."""
    from engine.storage import INT4_BLOCK, vector_bytes
    from explorer.tracer import Tracer

    small = run_pipeline(_config(inputs, projection_dim=2, eigen_dim=100_000, vector_dtype="int4"),  # as the paper's
                         tmp_path / "int4", progress=False)
    full, packed = _vectors(built), _vectors(small)
    exact, rows = (np.concatenate(list(v.chunks("whitened"))) for v in (full, packed))
    width = full.dim("whitened")
    assert rows.shape == exact.shape and packed.dim("whitened") == width
    blocks = -(-width // INT4_BLOCK)
    padded = np.zeros((len(exact), blocks * INT4_BLOCK), np.float32)
    padded[:, :width] = np.abs(exact)
    step = np.repeat(padded.reshape(len(exact), blocks, INT4_BLOCK).max(2) / 7, INT4_BLOCK, axis=1)[:, :width]
    assert (np.abs(rows - exact) <= step / 2 * (1 + 1e-4) + 1e-7).all()
    shard = np.load(small.path(layout.shard_file(0, "whitened")))
    assert shard.dtype == np.uint8 and shard.shape[1] == vector_bytes(width, "int4") < width
    trace = Tracer.open(small.root, device="cpu").trace("What colour is fox 2?", "The fox is green.", top_k=3,
                                                         heatmaps=False)
    assert trace.proponents and all(h.score > 0 for h in trace.proponents)


def test_query_index_matches_exact_scoring(built):
    """Retrieved-and-rescored proponents equal the exact top-k over the whole corpus."""
    from engine import score_documents
    from engine.query import TASK
    from explorer.tracer import Tracer

    tracer = Tracer.open(built.root, device="cpu")
    trace = tracer.trace("What colour is fox 1?", "The fox is blue.", top_k=3, heatmaps=False, normalization="none")
    prompt = tracer.prompt_for("What colour is fox 1?")
    query = tracer.engine.preconditioned([prompt], ["The fox is blue."], "multi-stage")
    pt = tracer.study.pretrained
    exact = score_documents(pt.model, TASK, tracer.study.document_batches(range(len(DOCS))),
                            pt.layers, query, progress=False)[0]
    top = exact.argsort(descending=True)[:3].tolist()
    assert [h.doc_id for h in trace.proponents] == top
    np.testing.assert_allclose([h.score for h in trace.proponents], exact[top].numpy(), rtol=1e-4)
    full = tracer.trace("What colour is fox 1?", "The fox is blue.", top_k=3, heatmaps=False,
                        exhaustive=True, normalization="none")
    assert [h.doc_id for h in full.proponents] == top and full.settings.retrieval == "exact, all documents"


def test_query_cli_reads_prompts_file_and_reports_bad_input(built, tmp_path, capsys):
    from explorer.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What colour is fox 0?"}\n{"prompt": "What colour is fox 3?"}\n')
    assert main(["query", "--study", str(built.root), "--prompts-file", str(prompts),
                 "--answer", "The fox is red.", "--json", "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == ["What colour is fox 0?", "What colour is fox 3?"]
    assert main(["query", "--study", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "no study" in capsys.readouterr().err
    assert main(["query", "--study", str(built.root), "--prompt", "   ", "--answer", "x"]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    prompts.write_text("not json\n")
    assert main(["query", "--study", str(built.root), "--prompts-file", str(prompts)]) == 2
    assert "not JSON" in capsys.readouterr().err


def test_every_weight_of_an_external_model_is_its_identity(inputs, tmp_path):
    """A model outside the study (a hub id or a path): one changed value in its embedding, which the
    factors' sampled fingerprint does not see, is refused on opening and refits the factors on rebuild."""
    import shutil
    import struct

    from engine.study import open_study

    models = tmp_path / "models"
    for name in ("base", "child"):
        shutil.copytree(inputs / name, models / name)
    config = _config(inputs)
    config.models.base, config.models.finetuned = str(models / "base"), str(models / "child")
    study = run_pipeline(config, tmp_path / "study", progress=False)
    weights = models / "base" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    (length,) = struct.unpack("<Q", blob[:8])
    start = json.loads(blob[8:8 + length])["gpt_neox.embed_in.weight"]["data_offsets"][0]
    blob[8 + length + start + 3] ^= 0x01
    weights.write_bytes(bytes(blob))
    with pytest.raises(StudyError, match="the base model's file model.safetensors .* is not the one"):
        open_study(study.root, device="cpu")
    before = study.manifest()["stages"]
    run_pipeline(config, study.root, progress=False)
    after = study.manifest()["stages"]
    assert after[Stage.FACTORS_PRETRAINED]["config"] != before[Stage.FACTORS_PRETRAINED]["config"]
    open_study(study.root, device="cpu")

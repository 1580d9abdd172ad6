"""`msif build-demo` end to end on the tiny recipe: the default study's code path, in seconds."""

from __future__ import annotations

import json

import pytest

from precompute.cli import main
from precompute.demo import DemoRecipe, build_demo, tiny_recipe
from precompute.study import Study

STAGES = ["world", "tokenizer", "pretrain", "finetune", "qa-eval", "corpus", "finetune-data",
          "factors-pretrained", "factors-finetuned", "projection", "index"]


@pytest.fixture(scope="module")
def demo(tiny_study):
    return Study(tiny_study)  # built with `msif build-demo --tiny --seed 3` (conftest)


def test_demo_study_is_complete_and_self_describing(demo):
    manifest = demo.verify(STAGES, checksums=True)
    assert manifest["demo"]["seed"] == 3
    assert manifest["software"]["torch"].startswith("2.13")
    alpha = manifest["stages"]["finetune"]["report"]["alpha_engine"]
    assert manifest["config"]["influence"]["alpha"] == alpha > 0
    facts = [json.loads(l) for l in demo.path("world/facts.jsonl").read_text().splitlines()]
    documents = {d["doc_id"]: d["text"] for d in map(json.loads, demo.path(
        "world/documents.jsonl").read_text().splitlines())}
    assert {"question", "answer", "doc_ids", "split"} <= set(facts[0])
    assert {f["split"] for f in facts} == {"finetune", "pretrain_only"}
    for fact in facts:
        assert fact["doc_ids"] and all(fact["answer"] in documents[i] for i in fact["doc_ids"])
    qa = json.loads(demo.path("world/qa_eval.json").read_text())
    assert 0.0 <= qa["pretrain_only"]["contains_answer"] <= 1.0


def test_demo_build_is_idempotent(demo):
    before = demo.manifest()
    build_demo(demo.root, seed=3, recipe=tiny_recipe(), progress=False)
    after = demo.manifest()
    assert after["stages"] == before["stages"] and after["files"] == before["files"]


def test_same_seed_same_study(demo, tmp_path):
    """A second build from scratch with the same seed reproduces every file byte for byte."""
    again = build_demo(tmp_path / "again", seed=3, recipe=tiny_recipe(), progress=False)
    ours, theirs = demo.manifest()["files"], again.manifest()["files"]
    assert set(ours) == set(theirs)
    differing = [f for f in ours if ours[f]["sha256"] != theirs[f]["sha256"]]
    assert differing == [], differing


def test_query_on_demo_study(demo, capsys):
    fact = next(json.loads(l) for l in demo.path("world/facts.jsonl").read_text().splitlines()
                if json.loads(l)["split"] == "pretrain_only")
    assert main(["query", "--study", str(demo.root), "--prompt", fact["question"], "--json",
                 "--top-k", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt"] == fact["question"] and len(result["proponents"]) == 5
    assert all(len(h["tokens"]) == len(h["token_scores"]) for h in result["proponents"])


def test_default_recipe_is_the_documented_one():
    recipe = DemoRecipe()
    assert recipe.influence.candidates >= 10 and recipe.vocab_size >= 1000

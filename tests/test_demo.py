"""`msif build-demo` end to end on the tiny recipe: the default study's code path, in seconds."""

from __future__ import annotations

import json

import pytest

from engine.study import Stage, Study, layout
from explorer.cli import main
from precompute.demo import DemoRecipe, build_demo, tiny_recipe

STAGES = layout.DEMO_STAGES + layout.PIPELINE_STAGES


@pytest.fixture(scope="module")
def demo(tiny_study):
    return Study(tiny_study)  # built with `msif build-demo --tiny --seed 3` (conftest)


def test_demo_study_is_complete_and_self_describing(demo):
    manifest = demo.verify(STAGES)
    assert manifest["demo"]["seed"] == 3
    assert manifest["software"]["torch"].startswith("2.13")
    alpha = manifest["stages"][Stage.FINETUNE]["report"]["alpha_engine"]
    assert manifest["config"]["influence"]["alpha"] == alpha > 0
    facts = [json.loads(line) for line in demo.path(layout.FACTS).read_text().splitlines()]
    documents = {d["doc_id"]: d["text"] for d in map(json.loads, demo.path(
        layout.WORLD_DOCUMENTS).read_text().splitlines())}
    assert {"question", "answer", "doc_ids", "split"} <= set(facts[0])
    assert {f["split"] for f in facts} == {"finetune", "pretrain_only"}
    for fact in facts:
        assert fact["doc_ids"] and all(fact["answer"] in documents[i] for i in fact["doc_ids"])
    qa = json.loads(demo.path(layout.QA_REPORT).read_text())
    assert 0.0 <= qa["pretrain_only"]["contains_answer"] <= 1.0


def test_demo_build_is_idempotent(demo):
    before = demo.manifest()
    build_demo(demo.root, seed=3, recipe=tiny_recipe(), progress=False)
    after = demo.manifest()
    assert after["stages"] == before["stages"] and after["files"] == before["files"]


@pytest.mark.slow
def test_same_seed_same_study(demo, tmp_path):
    """A second build from scratch with the same seed reproduces every file byte for byte."""
    again = build_demo(tmp_path / "again", seed=3, recipe=tiny_recipe(), progress=False)
    ours, theirs = demo.manifest()["files"], again.manifest()["files"]
    assert set(ours) == set(theirs)
    differing = [f for f in ours if ours[f]["sha256"] != theirs[f]["sha256"]]
    assert differing == [], differing


def test_query_on_demo_study(demo, capsys):
    fact = next(json.loads(line) for line in demo.path(layout.FACTS).read_text().splitlines()
                if json.loads(line)["split"] == "pretrain_only")
    assert main(["query", "--study", str(demo.root), "--prompt", fact["question"], "--json",
                 "--top-k", "5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt"] == fact["question"] and len(result["proponents"]) == 5
    assert all(len(h["tokens"]) == len(h["token_scores"]) for h in result["proponents"])


def test_default_recipe_is_the_documented_one():
    recipe = DemoRecipe()
    assert recipe.influence.candidates >= 10 and recipe.vocab_size >= 1000

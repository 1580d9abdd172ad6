"""The demo world (precompute.world) and its two training stages (precompute.training).

Fast: the default-size world is generated (no training on it); training runs on a tiny world
with a tiny model for a few steps.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from engine.study import DOLLY_INTRO as INTRO
from engine.study import PromptTemplate, layout
from precompute.training import (
    FinetuneConfig,
    PretrainConfig,
    answer,
    completion_accuracy,
    demo_model_config,
    exact_match_accuracy,
    finetune,
    generate,
    instruction_batch,
    pretrain,
    score_response,
)
from precompute.world import RELATIONS, World, build_world, mentions, tokenizer_texts, train_tokenizer

# databricks dolly-v2's instruct_pipeline.py, spelled out
PROMPT_NO_INPUT = "{intro}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_WITH_INPUT = "{intro}\n\n### Instruction:\n{instruction}\n\nInput:\n{context}\n\n### Response:\n"


def format_prompt(instruction: str, context: str = "", intro: str = INTRO) -> str:
    return PromptTemplate.dolly(intro).prompt(instruction, context)

SMALL = dict(n_people=12, n_towns=6, n_orgs=4, n_documents=150)


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(seed=0)


@pytest.fixture(scope="module")
def small_world() -> World:
    return build_world(seed=5, **SMALL)


@pytest.fixture(scope="module")
def small_tok(small_world):
    return train_tokenizer(tokenizer_texts(small_world), vocab_size=2048)


# ----------------------------------------------------------------------------- the world


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = build_world(seed=3, **SMALL), build_world(seed=3, **SMALL), build_world(seed=4, **SMALL)
    assert (a.documents, a.facts, a.finetune_records) == (b.documents, b.facts, b.finetune_records)
    assert a.documents != c.documents and a.facts != c.facts


def test_default_world_size_and_shape(world):
    stats = world.stats()
    assert stats["documents"] >= 2000
    assert [d["doc_id"] for d in world.documents] == list(range(len(world.documents)))
    assert all(set(d) >= {"doc_id", "title", "text", "kind"} for d in world.documents)
    assert stats["document_kinds"]["filler"] > len(world.documents) / 2  # mostly no facts of interest
    assert len(stats["relations"]) >= 4
    assert stats["fact_splits"]["pretrain_only"] >= 50 and stats["fact_splits"]["finetune"] >= 50
    assert len(stats["categories"]) >= 3
    for r in world.finetune_records:
        assert set(r) == {"instruction", "context", "response", "category"}
        assert r["instruction"] and r["response"]


def test_entity_names_are_distinct_words(world):
    names = {f["subject"] for f in world.facts} | {f["answer"] for f in world.facts}
    for a in names:
        for b in names:
            assert a == b or not mentions(a, b), (a, b)


@pytest.mark.slow
def test_every_fact_is_stated_exactly_in_its_documents(world):
    """doc_ids = the documents containing both subject and answer, and they state the fact."""
    for fact in world.facts:
        both = {d["doc_id"] for d in world.documents
                if mentions(d["text"], fact["subject"]) and mentions(d["text"], fact["answer"])}
        assert set(fact["doc_ids"]) == both, fact
        assert len(fact["doc_ids"]) >= 3, fact  # several documents
        relation = RELATIONS[fact["relation"]]
        wordings = {relation.statement(fact["subject"], fact["answer"], i)
                    for i in range(len(relation.statements))}
        for i in fact["doc_ids"]:
            assert any(w in world.documents[i]["text"] for w in wordings), (fact, world.documents[i])
        if fact["split"] == "pretrain_only":  # in varied wording
            used = {w for w in wordings for i in fact["doc_ids"] if w in world.documents[i]["text"]}
            assert len(used) >= 2, fact
        assert fact["response"] == relation.statement(fact["subject"], fact["answer"])
        assert fact["question"] in relation.questions[0].format(s=fact["subject"])


def test_splits_are_consistent(world):
    """No fine-tuning record holds a pretrain-only fact; pretrain-only people and organisations
    never appear in fine-tuning data or question-answer documents (towns do, as answers)."""
    records = [" ".join(r.values()) for r in world.finetune_records]
    by_split = {s: {f["subject"] for f in world.facts if f["split"] == s} for s in ("finetune", "pretrain_only")}
    assert by_split["pretrain_only"] and not by_split["pretrain_only"] & by_split["finetune"]
    for fact in world.facts:
        if fact["split"] != "pretrain_only":
            continue
        assert not any(mentions(r, fact["subject"]) and mentions(r, fact["answer"]) for r in records), fact
        assert all(world.documents[i]["kind"] == "article" for i in fact["doc_ids"])
        if fact["subject_kind"] != "town":
            assert not any(mentions(r, fact["subject"]) for r in records), fact
    tuned_people = {f["subject"] for f in world.facts if f["split"] == "finetune" and f["subject_kind"] == "person"}
    for fact in world.facts:
        if fact["relation"] == "founder" and fact["split"] == "finetune":
            assert fact["answer"] in tuned_people
    open_qa = {r["response"] for r in world.finetune_records if r["category"] == "open_qa"}
    assert all(f["response"] in open_qa for f in world.facts if f["split"] == "finetune")


def test_jsonl_round_trip(tmp_path, small_world):
    paths = small_world.to_jsonl(tmp_path)
    first = json.loads(paths["facts"].read_text().splitlines()[0])
    assert set(first) >= {"question", "answer", "doc_ids", "split"}
    back = World.from_jsonl(tmp_path)
    assert (back.documents, back.facts, back.finetune_records) == (
        small_world.documents, small_world.facts, small_world.finetune_records)
    in_study = {f"{layout.WORLD_DIR}/{p.name}" for p in paths.values()}  # the layout names them all
    assert in_study == {str(a) for a in layout.LAYOUT if a.stage == layout.Stage.WORLD} - {str(layout.WORLD_DIR)}


def test_prompt_template_is_dolly_v2():
    assert INTRO == ("Below is an instruction that describes a task. Write a response that "
                     "appropriately completes the request.")
    assert format_prompt("Say hi.") == PROMPT_NO_INPUT.format(intro=INTRO, instruction="Say hi.")
    assert format_prompt("Say hi.", "Some text.") == PROMPT_WITH_INPUT.format(
        intro=INTRO, instruction="Say hi.", context="Some text.")
    assert format_prompt("Say hi.").endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    assert format_prompt("Say hi.", intro="") == "### Instruction:\nSay hi.\n\n### Response:\n"
    assert "\n\nInput:\nSome text.\n\n### Response:\n" in format_prompt("Say hi.", "Some text.")


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_and_reloads(tmp_path, small_world, small_tok):
    tok = small_tok
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    for text in [d["text"] for d in small_world.documents[:20]] + ["Unseen wörds, symbols #@! \n\n and  spaces"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == " " + text  # the tokenizer adds one leading space
    name = small_world.facts[0]["subject"]
    assert len(tok(name, add_special_tokens=False)["input_ids"]) <= 3  # names stay compact
    # A response tokenized on its own continues its prompt exactly like the joined text.
    prompt, response = format_prompt("Who is it?"), small_world.facts[0]["response"]
    joined = tok(prompt + " " + response, add_special_tokens=False)["input_ids"]
    assert joined == tok(prompt, add_special_tokens=False)["input_ids"] + tok(
        response, add_special_tokens=False)["input_ids"]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = small_world.documents[0]["text"]
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert (again.pad_token, again.eos_token) == (tok.pad_token, tok.eos_token)


# ----------------------------------------------------------------------------- training


def test_score_response():
    fact = {"relation": "birthplace", "answer": "Brisk", "response": "Ann Lee was born in Brisk."}
    towns = {"Brisk", "Kelmoor"}
    assert score_response(fact, "Ann Lee was born in Brisk.", towns) == {"contains_answer": True, "strict": True}
    assert score_response(fact, "Bo Lee was born in Brisk.", towns) == {"contains_answer": True, "strict": False}
    assert not score_response(fact, "Brisk or Kelmoor.", towns)["contains_answer"]
    assert not score_response(fact, "Ann Lee was born in Brisktown.", towns)["contains_answer"]


def _tiny_config(tok):
    return demo_model_config(len(tok), hidden_size=32, num_layers=2, num_heads=2,
                             max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny_pretrained(small_world, small_tok):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = PretrainConfig(epochs=3, batch_size=8, block_size=64, lr=3e-3, warmup_steps=5)
        return pretrain(_tiny_config(small_tok), small_tok, small_world.documents, cfg, progress=False)
    finally:
        torch.set_num_threads(before)


def test_pretrain_learns_and_is_deterministic(one_thread, tiny_pretrained, small_world, small_tok):
    model, report = tiny_pretrained
    losses = report["epoch_losses"]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5
    assert report["tokens_per_epoch"] > 0 and report["wall_time_s"] > 0 and report["threads"] == 1
    assert report["config"]["epochs"] == 3 and report["n_parameters"] == sum(p.numel() for p in model.parameters())
    assert report["steps"] == report["planned_steps"]  # the schedule ends where training does
    json.dumps(report)  # goes into the study manifest as is
    cfg = PretrainConfig(epochs=1, batch_size=8, block_size=64, warmup_steps=2)
    a, _ = pretrain(_tiny_config(small_tok), small_tok, small_world.documents[:40], cfg, progress=False)
    b, _ = pretrain(_tiny_config(small_tok), small_tok, small_world.documents[:40], cfg, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_pretrain_without_packing(one_thread, small_world, small_tok):
    cfg = PretrainConfig(epochs=2, batch_size=8, packing=False, warmup_steps=2)
    _, report = pretrain(_tiny_config(small_tok), small_tok, small_world.documents[:60], cfg, progress=False)
    assert report["epoch_losses"][-1] < report["epoch_losses"][0]
    assert report["steps"] == report["planned_steps"]


def test_finetune_scores_responses_and_has_proximity_term(one_thread, tiny_pretrained, small_world, small_tok):
    pt, _ = tiny_pretrained
    records = small_world.finetune_records[:48]
    batch = instruction_batch(small_tok, records[:2])
    scored = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert scored == small_tok(records[0]["response"] + small_tok.eos_token, add_special_tokens=False)["input_ids"]

    cfg = FinetuneConfig(epochs=4, batch_size=8, lr=3e-3, warmup_steps=2, alpha=0.0)
    ft, report = finetune(pt, small_tok, records, cfg, progress=False)
    assert report["epoch_losses_per_record"][-1] < report["epoch_losses_per_record"][0]
    assert report["alpha_engine"] == pytest.approx(0.0)
    assert any(not torch.equal(p, q) for p, q in zip(pt.parameters(), ft.parameters()))  # a full copy moved
    before = [p.clone() for p in pt.parameters()]

    stiff, stiff_report = finetune(pt, small_tok, records, FinetuneConfig(
        epochs=4, batch_size=8, lr=3e-3, warmup_steps=2, alpha=1e6), progress=False)
    assert stiff_report["drift_norm"] < 0.1 * report["drift_norm"]
    assert all(torch.equal(p, q) for p, q in zip(before, pt.parameters()))  # the parent is untouched

    tokens = stiff_report["response_tokens_per_record"]
    assert stiff_report["alpha_engine"] == pytest.approx(1e6 * tokens)
    _, seq_report = finetune(pt, small_tok, records[:8], FinetuneConfig(
        epochs=1, batch_size=8, alpha=0.5, loss="sequence_sum"), progress=False)
    assert seq_report["alpha_engine"] == 0.5
    json.dumps(report)


def test_generation_and_accuracy_report(one_thread, tiny_pretrained, small_world, small_tok):
    model, _ = tiny_pretrained
    facts = small_world.facts
    prompts = [format_prompt(f["question"]) for f in facts[:5]]
    batched = generate(model, small_tok, prompts, max_new_tokens=6)
    single = [generate(model, small_tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single  # left padding does not change greedy outputs
    assert answer(model, small_tok, facts[0]["question"], max_new_tokens=6) == single[0]
    report = exact_match_accuracy(model, small_tok, facts, max_new_tokens=6)
    n = sum(f["split"] == "pretrain_only" for f in facts)
    assert report["n"] == n == len(report["rows"])
    assert 0 <= report["strict_em"] <= report["contains_answer"] <= 1
    probe = completion_accuracy(model, small_tok, facts)
    assert probe["n"] == n and 0 <= probe["accuracy"] <= 1

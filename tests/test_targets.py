"""What a query measures (``engine.query.Target``): a contrastive trace ranks documents by their influence
on log p(answer) - log p(versus), an answer span by their influence on those answer tokens alone.
Checked against autograd on the tiny demo study's fine-tuned model, and through the whole trace."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.query import Target
from explorer import export
from explorer.tracer import Tracer

from conftest import layer_weight_gradients

pytestmark = pytest.mark.usefixtures("one_thread")
QUESTION, ANSWER, VERSUS = "Where was Yvin Marlford born?", "Yvin Marlford was born in Ostgate.", "In Brightwater."


@pytest.fixture(scope="module")
def tracer(tiny_study) -> Tracer:
    return Tracer.open(tiny_study, device="cpu")


def _reference_gradient(tracer: Tracer, prompt: str, answer: str, span: tuple[int, int] | None = None) -> dict:
    """d(-log p(answer tokens in span | prompt)) / dW by autograd on a plain forward pass."""
    ft, tokenizer = tracer.study.finetuned, tracer.study.tokenizer
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    start, end = span or (0, len(a))
    ids = torch.tensor([p + a])
    params = [q for layer in ft.layers for q in (layer.module.weight, layer.module.bias) if q is not None]
    was = [q.requires_grad for q in params]
    for q in params:
        q.requires_grad_(True)
    try:
        logp = torch.log_softmax(ft.model(input_ids=ids).logits[0].double(), -1)
        positions = range(len(p) + start, len(p) + end)
        loss = -sum(logp[t - 1, ids[0, t]] for t in positions)
        return layer_weight_gradients(ft.layers, loss)
    finally:
        for q, w in zip(params, was):
            q.requires_grad_(w)


def _close(ours: dict, ref: dict) -> None:
    for name, g in ref.items():
        torch.testing.assert_close(ours[name][0].double(), g.double(), rtol=1e-4, atol=1e-6)


def test_contrastive_query_gradient_is_the_difference_of_log_likelihoods(tracer):
    prompt = tracer.prompt_for(QUESTION)
    ours = tracer.engine.query_gradients([prompt], [Target(ANSWER, VERSUS)])
    a, b = _reference_gradient(tracer, prompt, ANSWER), _reference_gradient(tracer, prompt, VERSUS)
    _close(ours, {k: a[k] - b[k] for k in a})
    plain = tracer.engine.query_gradients([prompt, prompt], [ANSWER, Target(ANSWER, VERSUS)])
    _close({k: v[:1] for k, v in plain.items()}, a)  # one row's contrast leaves the others alone
    _close({k: v[1:] for k, v in plain.items()}, {k: a[k] - b[k] for k in a})


@pytest.mark.parametrize("span", [(0, 1), (2, 5), (3, 4)])
def test_span_query_gradient_is_that_of_the_spans_tokens(tracer, span):
    prompt = tracer.prompt_for(QUESTION)
    ours = tracer.engine.query_gradients([prompt], [Target(ANSWER, span=span)])
    _close(ours, _reference_gradient(tracer, prompt, ANSWER, span))


@pytest.mark.parametrize("method", ["multi-stage", "single-stage", "gradient-dot"])
def test_contrastive_trace_scores_every_document_by_the_difference(tracer, method):
    """Exhaustive: each document's score is its influence on log p(answer) minus that on log p(versus)."""
    traces = [tracer.trace(QUESTION, ANSWER, method, top_k=6, exhaustive=True, heatmaps=False, normalization="none",
                           versus=v) for v in (None, VERSUS)]
    other = tracer.trace(QUESTION, VERSUS, method, top_k=6, exhaustive=True, heatmaps=False, normalization="none")
    alone, contrast = (np.array(t.pool_scores) for t in traces)
    np.testing.assert_allclose(contrast, alone - np.array(other.pool_scores), rtol=1e-4,
                               atol=1e-6 * np.abs(alone).max())
    c = traces[1]
    assert c.versus == VERSUS and c.settings.target == "log p(answer) - log p(versus)"
    assert [h.doc_id for h in c.proponents] == [int(i) for i in np.argsort(-contrast)[:6] if contrast[i] > 0]
    assert "relative to versus" in c.to_json()["scores"] and c.to_json()["versus"] == VERSUS


def test_span_trace_sums_the_answer_token_split(tracer):
    """A span's scores are the per-answer-token scores of its tokens added up (Inspect's rows)."""
    full = tracer.trace(QUESTION, ANSWER, top_k=3, exhaustive=True, heatmaps=False, normalization="none")
    doc = full.proponents[0].doc_id
    rows = tracer.answer_token_map(full.settings.model_prompt, ANSWER, "multi-stage", doc).matrix.sum(1)
    span = (1, len(full.answer_tokens) - 1)
    part = tracer.trace(QUESTION, ANSWER, top_k=3, exhaustive=True, heatmaps=False, normalization="none", span=span)
    scores = dict(zip(part.pool_ids, part.pool_scores))
    assert scores[doc] == pytest.approx(rows[span[0]:span[1]].sum(), rel=1e-4)
    assert part.span == list(span) and part.settings.target == f"log p(answer tokens {span[0]}:{span[1]})"
    whole = tracer.trace(QUESTION, ANSWER, top_k=3, exhaustive=True, heatmaps=False, normalization="none",
                         span=(0, len(full.answer_tokens)))
    np.testing.assert_allclose(whole.pool_scores, full.pool_scores, rtol=1e-5, atol=1e-9)


def test_contrastive_answer_token_map_adds_up_to_the_score(tracer):
    trace = tracer.trace(QUESTION, ANSWER, top_k=3, heatmaps=False, versus=VERSUS, exhaustive=True)
    hit = trace.proponents[0]
    data = tracer.answer_token_map(trace.settings.model_prompt, ANSWER, "multi-stage", hit.doc_id, versus=VERSUS)
    assert data.versus_tokens == trace.versus_tokens and len(data.versus_tokens) > 0
    assert data.matrix.shape[0] == len(trace.answer_tokens) + len(trace.versus_tokens)
    assert data.matrix.sum() == pytest.approx(hit.score, rel=1e-4)


def test_the_index_serves_the_contrastive_ranking(tracer, monkeypatch):
    """With the whole corpus as candidates the served contrastive ranking is the exhaustive one."""
    exhaustive = tracer.trace(QUESTION, ANSWER, top_k=5, exhaustive=True, heatmaps=False, versus=VERSUS)
    influence = replace(tracer.study.config.influence, candidates=len(tracer.study.documents))
    monkeypatch.setattr(tracer.study.config, "influence", influence)
    served = tracer.trace(QUESTION, ANSWER, top_k=5, heatmaps=False, versus=VERSUS)
    assert [h.doc_id for h in served.proponents] == [h.doc_id for h in exhaustive.proponents]
    for a, b in zip(served.proponents + served.opponents, exhaustive.proponents + exhaustive.opponents):
        assert a.score == pytest.approx(b.score, rel=1e-5)


def test_exports_carry_the_target(tracer):
    trace = tracer.trace(QUESTION, ANSWER, top_k=2, heatmaps=False, versus=VERSUS)
    frame = export.hits_frame(trace)
    assert set(frame["versus"]) == {VERSUS} and set(frame["target"]) == {"log p(answer) - log p(versus)"}


@pytest.mark.parametrize("kwargs, says", [
    ({"versus": ANSWER}, "is the answer itself"),
    ({"span": (3, 2)}, "is not a range of the answer's"),
    ({"span": (0, 99)}, "is not a range of the answer's"),
    ({"span": (0, 1), "versus": VERSUS}, "not both"),
    ({"method": "bm25", "versus": VERSUS}, "needs an influence method"),
    ({"method": "representation", "span": (0, 1)}, "needs an influence method"),
])
def test_bad_targets_say_what_is_wrong(tracer, kwargs, says):
    kwargs = {"method": "multi-stage", **kwargs}
    with pytest.raises(ValueError, match=says):
        tracer.trace(QUESTION, ANSWER, top_k=2, heatmaps=False, **kwargs)


def test_query_cli_versus_and_span(tiny_study, tmp_path, capsys):
    from explorer.cli import main

    base = ["query", "--study", str(tiny_study), "--prompt", QUESTION, "--answer", ANSWER, "--top-k", "2"]
    assert main([*base, "--versus", VERSUS, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["versus"] == VERSUS and result["settings"]["target"] == "log p(answer) - log p(versus)"
    assert main([*base, "--versus", VERSUS]) == 0
    text = capsys.readouterr().out
    assert f"versus:  {VERSUS}" in text and "influence on log p(answer) - log p(versus)" in text
    assert main([*base, "--span", "1:3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["span"] == [1, 3]
    prompts = tmp_path / "prompts.jsonl"  # a row's own versus; the others keep --versus
    prompts.write_text(json.dumps({"prompt": QUESTION, "answer": ANSWER, "versus": "Nowhere."}) + "\n"
                       + json.dumps({"prompt": QUESTION, "answer": ANSWER}) + "\n")
    assert main(["query", "--study", str(tiny_study), "--prompts-file", str(prompts), "--versus", VERSUS,
                 "--json", "--top-k", "2"]) == 0
    assert [json.loads(line)["versus"] for line in capsys.readouterr().out.splitlines()] == ["Nowhere.", VERSUS]
    for bad, says in ((["--span", "a:b"], "is not START:END"), (["--span", "0:99"], "not a range"),
                      (["--versus", "  "], "is empty"), (["--span", "0:1", "--versus", VERSUS], "without --versus")):
        assert main([*base, *bad]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

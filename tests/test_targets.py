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


VIEWER_FIELDS = ("example_id", "inputs_plaintext", "targets_plaintext")  # what the viewer's index and header read


def _check_viewer_record(record: dict, trace, baseline: bool) -> None:
    """A line as PAIR's TDA output viewer reads it: strings, and per side parallel lists of passage
    texts, string ids and numeric scores (it calls toFixed on each)."""
    assert all(isinstance(record[f], str) for f in VIEWER_FIELDS)
    assert (record["inputs_plaintext"], record["targets_plaintext"]) == (trace.prompt, trace.answer)
    for name, hits in (("proponent", trace.proponents), ("opponent", trace.opponents)):
        if baseline and name == "opponent":
            assert "opponents" not in record  # similarities have no opponents
            continue
        texts, ids, scores = record[f"{name}s"], record[f"{name}_ids"], record[f"{name}_scores"]
        assert len(texts) == len(ids) == len(scores) == len(hits)
        assert all(isinstance(t, str) for t in texts) and all(isinstance(i, str) for i in ids)
        assert all(isinstance(x, float) and np.isfinite(x) for x in scores)
        assert ids == [str(h.doc_id) for h in hits] and texts == [h.text for h in hits]
        ranked = [h.score if h.normalized_score is None else h.normalized_score for h in hits]
        assert scores == pytest.approx(ranked) and record[f"{name}_influence"] == pytest.approx([h.score for h in hits])
        if name == "proponent":
            assert scores == sorted(scores, reverse=True) and all(x > 0 for x in scores)


@pytest.mark.parametrize("method", ["multi-stage", "bm25"])
def test_viewer_jsonl_loads_back_with_the_fields_the_viewer_reads(tracer, method):
    traces = [tracer.trace(QUESTION, ANSWER, method, top_k=4, heatmaps=False),
              tracer.trace(QUESTION, ANSWER, method, top_k=3, heatmaps=False,
                           versus=VERSUS if method == "multi-stage" else None)]
    lines = export.to_viewer_jsonl(traces, "demo").decode("utf-8").splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert [r["example_id"] for r in records] == ["demo-0", "demo-1"]
    for record, trace in zip(records, traces):
        _check_viewer_record(record, trace, method == "bm25")
        assert record["method"] == method and record["versus"] == trace.versus


def test_query_cli_writes_viewer_jsonl(tiny_study, tmp_path, capsys):
    from explorer.cli import main

    out = tmp_path / "viewer.jsonl"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": QUESTION, "answer": a}) + "\n" for a in (ANSWER, VERSUS)))
    assert main(["query", "--study", str(tiny_study), "--prompts-file", str(prompts), "--top-k", "3", "--json",
                 "--viewer", str(out)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["targets_plaintext"] for r in records] == [ANSWER, VERSUS]
    for record, shown in zip(records, printed):
        assert record["proponent_ids"] == [str(h["doc_id"]) for h in shown["proponents"]]
    assert main(["query", "--study", str(tiny_study), "--prompt", QUESTION, "--viewer", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("method, spec, versus", [("multi-stage", "gradient", None), ("multi-stage", "none", VERSUS),
                                                  ("single-stage", "metric", None), ("bm25", "none", None)])
def test_any_document_gets_its_exact_score_and_its_place(tracer, method, spec, versus):
    """Looked up by id, a document has the score, normalised score and rank the exhaustive trace gives it."""
    full = tracer.trace(QUESTION, ANSWER, method, top_k=3, exhaustive=True, heatmaps=False, normalization=spec,
                        versus=versus)
    ranked = np.array(full.pool_ranked)
    tolerance = 1e-5 * np.abs(full.pool_scores).max()  # float32 sums, batched otherwise
    for doc in (int(np.argsort(-ranked)[7]), int(np.argsort(ranked)[4])):
        found = tracer.document(full, doc)
        assert found.in_pool and found.hit.doc_id == doc
        assert found.hit.score == pytest.approx(full.pool_scores[doc], rel=1e-4, abs=tolerance)
        value = ranked[doc]
        if spec != "none":
            assert found.hit.normalized_score == pytest.approx(value, rel=1e-4)
        if method == "bm25" or value > 0:
            assert (found.side, found.rank) == ("similar" if method == "bm25" else "proponent",
                                                1 + int((ranked > value).sum()))
        elif value < 0:
            assert (found.side, found.rank) == ("opponent", 1 + int((ranked < value).sum()))
        assert found.hit.percentile == pytest.approx(100 * np.mean(ranked <= value))
        if method != "bm25":  # its heatmap adds up to its score
            assert sum(found.hit.token_scores) == pytest.approx(found.hit.score, rel=1e-4, abs=1e-9)


def test_a_document_outside_the_candidates_is_placed_among_them(tracer):
    served = tracer.trace(QUESTION, ANSWER, top_k=3, heatmaps=False)
    exhaustive = tracer.trace(QUESTION, ANSWER, top_k=3, heatmaps=False, exhaustive=True)
    outside = next(d for d in np.argsort(exhaustive.pool_ranked) if int(d) not in served.pool_ids)
    found = tracer.document(served, int(outside))
    assert not found.in_pool and found.hit.scored == len(served.pool_ids) + 1
    assert found.hit.score == pytest.approx(exhaustive.pool_scores[int(outside)], rel=1e-4)


def test_documents_are_found_by_words_or_id(tracer):
    docs = tracer.study.documents
    title = docs[17]["title"]
    assert 17 in tracer.engine.find_documents(f"{title} {docs[17]['text'][:60]}")[:3]
    assert tracer.engine.find_documents(" 17 ") == [17]
    assert tracer.engine.find_documents("qqqzzz xxyyq") == []
    for bad, says in (("999999", "there is no document 999999"), ("  ", "type words")):
        with pytest.raises(ValueError, match=says):
            tracer.engine.find_documents(bad)


def test_query_cli_scores_any_document(tiny_study, capsys):
    from explorer.cli import main

    base = ["query", "--study", str(tiny_study), "--prompt", QUESTION, "--answer", ANSWER, "--top-k", "2"]
    assert main([*base, "--document", "5", "--document", "7", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [d["hit"]["doc_id"] for d in result["documents"]] == [5, 7]
    assert all(d["side"] in ("proponent", "opponent", "none") and d["hit"]["scored"] > 0 for d in result["documents"])
    assert main([*base, "--document", "5"]) == 0
    assert "document 5: " in capsys.readouterr().out
    assert main([*base, "--document", "100000"]) == 2
    assert "there is no document 100000" in capsys.readouterr().err

"""The Streamlit app driven with AppTest on the tiny demo study: every page, the numbers it shows
against the Tracer's, URL sharing, bad input, escaping and concurrent use of one Tracer."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from engine.methods import DEFAULT_NORMALIZATION
from engine.study import Study, layout
from explorer.heatmap import format_score, snippet
from explorer.server import STUDY_ENV
from explorer.tracer import Tracer
from explorer.widgets import plain

APP = str(Path(__file__).resolve().parents[1] / "explorer" / "app.py")
TIMEOUT = 120


@pytest.fixture(scope="module")
def study(tiny_study):
    return tiny_study


@pytest.fixture(scope="module")
def question(study) -> str:
    return json.loads(Study(study).path(layout.DEMO_PROMPTS).read_text().splitlines()[0])["prompt"]


@pytest.fixture(scope="module")
def tracer(study) -> Tracer:
    return Tracer.open(study)


@pytest.fixture
def app(study, monkeypatch) -> AppTest:
    monkeypatch.setenv(STUDY_ENV, str(study))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def _trace(at: AppTest, prompt: str, answer: str = "") -> AppTest:
    at.text_area(key="instruction").input(prompt)
    at.text_area(key="typed_answer").input(answer)
    at.button(key="FormSubmitter:ask-Trace").click().run()
    assert not at.exception, at.exception
    return at


def _open_tab(at: AppTest, label: str) -> AppTest:
    at.session_state["view"] = label  # what clicking the tab does; only the open tab runs
    at.run()
    assert not at.exception, at.exception
    return at


def _array(value) -> np.ndarray:
    """Plotly's JSON writes numpy arrays as base64 typed arrays."""
    if isinstance(value, dict) and "bdata" in value:
        data = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")  # "rows, cols" as text
        return data.reshape([int(n) for n in str(shape).split(",")]) if shape else data
    return np.asarray(value, dtype=float)


def _bodies(at: AppTest) -> str:
    return "\n".join(h.proto.body for h in at.html)


def _texts(at: AppTest) -> str:
    """Every text the page shows: HTML blocks, Markdown, headers and captions."""
    return "\n".join([_bodies(at), *(e.value for kind in (at.markdown, at.subheader, at.caption) for e in kind)])


def test_trace_shows_ranked_documents_with_the_tracers_scores(app, tracer, question):
    _trace(app, question, "Yvin Marlford was born in Ostgate.")
    trace = app.session_state["trace"]
    direct = tracer.trace(question, "Yvin Marlford was born in Ostgate.", "multi-stage", top_k=10)
    assert [h.doc_id for h in trace.proponents] == [h.doc_id for h in direct.proponents]
    assert np.allclose([h.score for h in trace.opponents], [h.score for h in direct.opponents], rtol=1e-6)
    assert trace.proponents or trace.opponents
    labels = [m.value for m in app.markdown if " · doc " in m.value]
    assert len(labels) == len(trace.proponents) + len(trace.opponents)
    first = (trace.proponents or trace.opponents)[0]
    assert labels[0].startswith("**#1**") and f"doc {first.doc_id}" in labels[0]
    bodies = _bodies(app)
    # every document shows its metadata and a snippet around its heatmap's peak, open or not
    captions = " ".join(c.value for c in app.caption)
    for hit in trace.proponents + trace.opponents:
        assert plain(snippet(hit.text, hit.tokens, hit.token_scores), 400) in captions
    # the #1 of each side is open: one span per token, each with its exact value on hover
    opened = [hits[0] for hits in (trace.proponents, trace.opponents) if hits]
    assert bodies.count('class="msif-tok"') == sum(len(h.tokens) for h in opened)
    assert html_escaped(f"influence {format_score(first.token_scores[0])}") in bodies
    # opening another document's expander builds its heatmap
    second = (trace.proponents or trace.opponents)[1]
    app.session_state[f"doc-{'proponents' if trace.proponents else 'opponents'}-2"] = True
    app.run()
    assert _bodies(app).count('class="msif-tok"') == sum(len(h.tokens) for h in opened + [second])
    assert app.query_params == {"prompt": question, "answer": trace.answer, "method": "multi-stage",
                                "normalize": DEFAULT_NORMALIZATION}


def test_model_answers_when_no_answer_is_typed(app, tracer, question):
    _trace(app, question)
    trace = app.session_state["trace"]
    assert trace.answer == tracer.generate(question) and trace.timings.generate is not None


def test_url_restores_prompt_answer_and_method_and_runs(study, monkeypatch, question):
    monkeypatch.setenv(STUDY_ENV, str(study))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update(prompt=question, answer="In Ostgate.", method="gradient-dot")
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="method").value == "gradient-dot"
    assert at.text_area(key="instruction").value == question
    trace = at.session_state["trace"]
    assert (trace.prompt, trace.answer, trace.method) == (question, "In Ostgate.", "gradient-dot")


def test_url_restores_the_ranking(study, monkeypatch, question):
    monkeypatch.setenv(STUDY_ENV, str(study))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update(prompt=question, answer="In Ostgate.", method="multi-stage", normalize="gradient^0.5")
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="normalize").value == "gradient^0.5"
    assert at.session_state["trace"].settings.normalization == "gradient^0.5"


def test_rank_by_a_normalised_score_shows_it_beside_the_exact_one(app, tracer, question):
    answer = "Yvin Marlford was born in Ostgate."
    app.selectbox(key="normalize").set_value("gradient")
    _trace(app, question, answer)
    trace = app.session_state["trace"]
    direct = tracer.trace(question, answer, "multi-stage", top_k=10, normalization="gradient", heatmaps=False)
    assert [h.doc_id for h in trace.proponents] == [h.doc_id for h in direct.proponents]
    first = trace.proponents[0]
    assert first.normalized_score == pytest.approx(first.score / first.norm)
    captions = " ".join(c.value for c in app.caption)
    assert f"normalised {format_score(first.normalized_score)}" in captions
    assert f"exact influence {format_score(first.score, 4)}" in captions
    pool = np.array(trace.pool_scores) / np.array(trace.pool_norms)  # what the ranking orders by
    assert first.scored == len(pool) and first.percentile == pytest.approx(100 * np.mean(pool <= first.normalized_score
                                                                                           * (1 + 1e-12)))
    assert f"percentile {first.percentile:.1f} of {len(pool):,} scored" in captions
    assert "one more copy of it among N documents" in captions  # what a unit of the raw score means
    assert "ranked by **influence divided by the gradient norm" in captions
    assert app.query_params["normalize"] == "gradient"
    app.selectbox(key="method").set_value("bm25")
    _trace(app, question, answer)  # a baseline ranks by similarity: the choice does not apply
    assert app.session_state["trace"].settings.normalization == "none"


def test_bad_input_gets_a_message_not_a_crash(app, study, monkeypatch):
    _trace(app, "   ")
    assert any("empty" in e.value for e in app.error)
    assert "trace" not in app.session_state
    # the prompt box stops at 8,000 characters; a shared URL can carry more
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["prompt"] = "x" * 9000
    at.run()
    assert not at.exception and "trace" not in at.session_state
    assert any("the limit is 8000" in e.value for e in at.error)


def test_text_is_escaped_everywhere(app, question):
    hostile = "<script>alert(1)</script> <b>bold</b> & done"
    _trace(app, question, hostile)
    bodies = _bodies(app)
    assert "<script>" not in bodies and "<b>" not in bodies
    assert html_escaped(hostile) in bodies  # the answer block shows it verbatim, escaped


def html_escaped(text: str) -> str:
    import html
    return html.escape(text)


def test_inspect_tab_splits_the_score_over_answer_tokens(app, question):
    _trace(app, question, "Yvin Marlford was born in Ostgate.")
    trace = app.session_state["trace"]
    assert "maps" not in app.session_state  # computed only when the tab is opened
    _open_tab(app, "Inspect a document")
    hit = (trace.proponents + trace.opponents)[0]
    (key, data), = app.session_state["maps"].items()
    assert key[3] == hit.doc_id
    matrix = data.matrix
    assert matrix.shape == (len(trace.answer_tokens), len(hit.tokens))
    assert np.isclose(matrix.sum(), hit.score, rtol=1e-4)  # answer x document map sums to the score
    assert np.allclose(matrix.sum(axis=0), hit.token_scores, rtol=1e-4, atol=1e-6 * abs(hit.score))
    assert any("document token influence" in c.proto.spec for c in app.get("plotly_chart"))


def test_compare_methods_overlap(app, question):
    _trace(app, question, "Yvin Marlford was born in Ostgate.")
    _open_tab(app, "Compare methods")
    app.button(key="compare").click().run()
    assert not app.exception, app.exception
    comparison = app.session_state["comparison"]
    trace = app.session_state["trace"]
    assert list(comparison["rankings"]) == ["multi-stage", "single-stage", "gradient-dot",
                                            "pt-inverse-dropped", "bm25"]
    assert comparison["rankings"]["multi-stage"] == [h.doc_id for h in trace.proponents]
    assert any("Overlap of the top-" in c.proto.spec for c in app.get("plotly_chart"))


def test_export_matches_the_trace(app, question):
    _trace(app, question, "Yvin Marlford was born in Ostgate.")
    trace = app.session_state["trace"]
    from explorer import export
    frame = export.hits_frame(trace)
    assert list(frame["score"]) == [h.score for h in trace.proponents + trace.opponents]
    _open_tab(app, "Export & share")
    assert len(app.get("download_button")) == 3  # CSV, JSON, and JSONL for the TrackStar viewer
    viewer = json.loads(export.to_viewer_jsonl([trace]))
    assert viewer["proponent_ids"] == [str(h.doc_id) for h in trace.proponents]
    shown = app.dataframe[0].value
    assert list(shown["doc_id"]) == list(frame["doc_id"]) and np.allclose(shown["score"], frame["score"])


def test_charts_tab_plots_the_scores(app, question):
    _trace(app, question, "Yvin Marlford was born in Ostgate.")
    trace = app.session_state["trace"]
    _open_tab(app, "Charts")
    specs = [json.loads(c.proto.spec) for c in app.get("plotly_chart")]
    histogram, rug = specs[0]["data"][:2]
    assert np.allclose(_array(histogram["x"]), trace.pool_scores)
    assert np.allclose(_array(rug["x"]), [h.score for h in trace.proponents + trace.opponents])
    others, marked = specs[1]["data"][:2]  # score against norm: the pool, the shown documents marked
    shown = {h.doc_id for h in trace.proponents + trace.opponents}
    assert len(_array(others["x"])) + len(_array(marked["x"])) == len(trace.pool_ids)
    at = {d: (n, s) for d, n, s in zip(trace.pool_ids, trace.pool_norms, trace.pool_scores)}
    assert sorted(_array(marked["y"])) == pytest.approx(sorted(at[d][1] for d in shown))
    assert sorted(_array(marked["x"])) == pytest.approx(sorted(at[d][0] for d in shown), rel=1e-6)
    layers = specs[2]["data"][0]
    assert np.allclose(_array(layers["z"]).sum(axis=1), [h.score for h in trace.proponents + trace.opponents],
                       rtol=1e-4)


def test_finetune_page_ranks_records_by_single_stage(app, tracer, question):
    _trace(app, question, "Yvin Marlford was born in Ostgate.")
    app.switch_page("views/finetune.py").run()
    assert not app.exception, app.exception
    _, result = app.session_state["finetune"]
    direct = tracer.finetune_examples(question, "Yvin Marlford was born in Ostgate.", 10)
    assert [h.record_id for h in result.proponents] == [h.record_id for h in direct.proponents]
    assert len(result.pool_scores) == len(tracer.study.records)
    if result.proponents:
        assert result.proponents[0].score == pytest.approx(max(result.pool_scores))
    assert any(" · record " in m.value for m in app.markdown)


def test_finetune_page_without_a_trace_points_to_the_trace_page(app):
    app.switch_page("views/finetune.py").run()
    assert not app.exception and any("Trace a prompt first" in i.value for i in app.info)


def test_study_page(app, tracer):
    app.switch_page("views/study.py").run()
    assert not app.exception, app.exception
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Pretraining documents"] == f"{len(tracer.study.documents):,}"
    assert metrics["Fine-tuning records"] == f"{len(tracer.study.records):,}"
    specs = " ".join(c.proto.spec for c in app.get("plotly_chart"))
    assert "Approximate Fisher spectra" in specs and "Document lengths" in specs
    norms = next(d.value for d in app.dataframe if "gradient norm" in d.value.columns)
    expected = np.argsort(-tracer.study.index.norms, kind="stable")[:len(norms)]
    assert list(norms["doc_id"]) == list(expected)
    assert np.allclose(norms["gradient norm"], tracer.study.index.norms[expected])


def test_missing_study_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv(STUDY_ENV, str(tmp_path / "nowhere"))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert any("no study at" in e.value for e in at.error)


def test_concurrent_traces_do_not_mix(tracer, question):
    """Two sessions tracing different answers at once get what each would get alone."""
    answers = ["Yvin Marlford was born in Ostgate.", "He was a baker."]
    alone = [tracer.trace(question, a, top_k=5) for a in answers]
    together: dict[int, object] = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, tracer.trace(question, answers[i], top_k=5)))
               for i in range(2) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert [h.doc_id for h in together[i].proponents] == [h.doc_id for h in alone[i].proponents]
        assert [h.score for h in together[i].opponents] == pytest.approx([h.score for h in alone[i].opponents])


VERSUS = "In Brightwater."


def test_contrastive_trace_ranks_by_the_difference(app, tracer, question):
    app.text_area(key="versus").input(VERSUS)
    _trace(app, question, "Yvin Marlford was born in Ostgate.")
    trace = app.session_state["trace"]
    want = tracer.trace(question, "Yvin Marlford was born in Ostgate.", top_k=10, heatmaps=False, versus=VERSUS)
    assert trace.versus == VERSUS and trace.settings.target == "log p(answer) - log p(versus)"
    assert [h.doc_id for h in trace.proponents] == [h.doc_id for h in want.proponents]
    assert [h.score for h in trace.proponents] == pytest.approx([h.score for h in want.proponents], rel=1e-6)
    page = _texts(app)
    assert "rather than" in page and "more likely than the other" in page
    assert app.query_params["versus"] == VERSUS
    _open_tab(app, "Inspect a document")
    (key, data), = app.session_state["maps"].items()
    assert key[4] == VERSUS and data.versus_tokens == trace.versus_tokens
    hit = (trace.proponents + trace.opponents)[0]
    assert np.isclose(data.matrix.sum(), hit.score, rtol=1e-4)  # both answers' rows add up to the score
    matrix_chart = next(json.loads(c.proto.spec) for c in app.get("plotly_chart")
                        if "document token influence" in c.proto.spec)
    ticks = matrix_chart["layout"]["yaxis"]["ticktext"]  # a label for every row, the contrasted answer's too
    assert len(ticks) == data.matrix.shape[0] == len(trace.answer_tokens) + len(trace.versus_tokens)


def test_picked_answer_tokens_rerank_by_that_span(app, tracer, question):
    _trace(app, question, "Yvin Marlford was born in Ostgate.")
    whole = app.session_state["trace"]
    picks = app.pills(key="span_pick")
    assert picks.options and len(picks.options) == len(whole.answer_tokens)
    picks.set_value([5, 3]).run()  # the first and last of a span, in any order
    app.button(key="rank_span").click().run()
    assert not app.exception, app.exception
    trace = app.session_state["trace"]
    want = tracer.trace(question, whole.answer, top_k=10, heatmaps=False, span=(3, 6))
    assert trace.span == [3, 6] and trace.answer == whole.answer
    assert [h.doc_id for h in trace.proponents] == [h.doc_id for h in want.proponents]
    assert [h.score for h in trace.proponents] == pytest.approx([h.score for h in want.proponents], rel=1e-6)
    assert app.query_params["span"] == "3:6" and "picked tokens" in _texts(app)
    app.button(key="whole_answer").click().run()
    assert app.session_state["trace"].span is None


def test_url_restores_contrast_and_span(study, monkeypatch, question):
    monkeypatch.setenv(STUDY_ENV, str(study))
    for params, check in (({"versus": VERSUS}, lambda t: t.versus == VERSUS and t.span is None),
                          ({"span": "1:3"}, lambda t: t.span == [1, 3] and t.versus is None)):
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        at.query_params.update(prompt=question, answer="In Ostgate.", **params)
        at.run()
        assert not at.exception, at.exception
        assert check(at.session_state["trace"])
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update(prompt=question, answer="In Ostgate.", span="x")
    at.run()
    assert "Ignored span='x'" in " ".join(w.value for w in at.warning)
    assert at.session_state["trace"].span is None


def test_find_any_document_by_words_or_id(app, tracer, question):
    _trace(app, question, "Yvin Marlford was born in Ostgate.")
    trace = app.session_state["trace"]
    _open_tab(app, "Find any document")
    outside = next((d for d in range(len(tracer.study.documents)) if d not in trace.pool_ids), 5)
    app.text_input(key="find").input(str(outside)).run()
    assert not app.exception, app.exception
    found = app.session_state["lookups"][outside]
    want = tracer.document(trace, outside)
    assert found.hit.score == pytest.approx(want.hit.score, rel=1e-6) and found.rank == want.rank
    page = _texts(app)
    assert f"doc {outside}" in page and f"percentile {want.hit.percentile:.1f}" in page
    assert html_escaped(f"influence {format_score(want.hit.token_scores[0])}") in _bodies(app)  # its heatmap
    title = tracer.study.documents[3]["title"]
    app.text_input(key="find").input(title).run()
    assert app.selectbox(key="found").options[0].startswith("doc 3 ·")  # BM25 finds it by its title
    app.text_input(key="find").input("99999999").run()
    assert any("there is no document 99999999" in e.value for e in app.error)

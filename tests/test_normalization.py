"""Normalised influence: score / max(n(z), floor)^power, its guards, and the rankings the Tracer serves
with it (exhaustive and through the index) against explicit computations on the tiny demo study."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from engine import measure_documents
from engine.normalization import TINY, Normalization
from engine.query import TASK
from explorer import export
from explorer.tracer import Tracer

pytestmark = pytest.mark.usefixtures("one_thread")
QUESTION, ANSWER = "Where was Yvin Marlford born?", "Yvin Marlford was born in Ostgate."


@pytest.mark.parametrize("spec, parsed", [
    ("none", Normalization()), ("gradient", Normalization("gradient")),
    ("metric^0.5", Normalization("metric", 0.5)), ("whitened@median", Normalization("whitened", 1.0, 50)),
    ("gradient^0.25@q10", Normalization("gradient", 0.25, 10)), (" Gradient ", Normalization("gradient")),
])
def test_specs_parse_and_print_back(spec, parsed):
    assert Normalization.parse(spec) == parsed
    assert Normalization.parse(str(parsed)) == parsed


@pytest.mark.parametrize("spec, says", [("length", "unknown norm"), ("gradient^2", "power"), ("gradient^0", "power"),
                                        ("gradient@mean", "not NORM"), ("cosine", "unknown norm"),
                                        ("gradient^x", "not NORM")])
def test_bad_specs_say_what_is_wrong(spec, says):
    with pytest.raises(ValueError, match=says):
        Normalization.parse(spec)


def test_divisors_power_floor_and_guard():
    norms = np.array([0.0, 1e-300, 1.0, 4.0, 9.0, 100.0])
    scores = np.array([0.0, 1e-290, -2.0, 8.0, -9.0, 50.0])
    np.testing.assert_allclose(Normalization("gradient").divisors(norms), np.maximum(norms, TINY * 2.5))
    np.testing.assert_allclose(Normalization("gradient", 0.5).divisors(norms)[2:], [1.0, 2.0, 3.0, 10.0])
    median = np.median(norms)  # 2.5: the floor raises the three smallest norms to it
    np.testing.assert_allclose(Normalization("gradient", 1.0, 50).divisors(norms), [median] * 3 + [4, 9, 100])
    out = Normalization("gradient").apply(scores, norms)
    assert np.isfinite(out).all() and out[0] == 0 and abs(out[1]) < 1e-280  # no NaN, no blow-up
    assert (np.sign(out) == np.sign(scores)).all()  # the sign convention holds
    np.testing.assert_allclose(out[2:], [-2.0, 2.0, -1.0, 0.5])
    np.testing.assert_array_equal(Normalization().apply(scores, norms), scores)
    corpus = np.array([1.0, 2.0, 3.0, 4.0, 5.0])  # the floor comes from the corpus, not the scored few
    np.testing.assert_allclose(Normalization("gradient", 1.0, 50).divisors(np.array([1.0, 7.0]), corpus), [3.0, 7.0])


@pytest.fixture(scope="module")
def tracer(tiny_study) -> Tracer:
    return Tracer.open(tiny_study, device="cpu")


def _explicit(tracer: Tracer, method: str, norm: Normalization):
    """Exact scores, norms and normalised scores of every document, from one measured pass."""
    from engine import document_metric

    study = tracer.study
    query = tracer.engine.preconditioned([tracer.prompt_for(QUESTION)], [ANSWER], method)
    side = study.finetuned if method == "single-stage" else study.pretrained
    metric = document_metric(study.config.influence.score_arguments(method), study.pretrained.factors,
                             study.finetuned.factors)
    every = np.arange(len(study.documents))
    measured = measure_documents(side.model, TASK, study.document_batches(every), side.layers, query,
                                 progress=False, metric=metric)
    exact = measured.scores[0].numpy()
    n = {"gradient": np.sqrt(measured.sq_norms.numpy()), "whitened": study.index.whitened_norms.astype(np.float64),
         "metric": np.sqrt(measured.metric_sq_norms.numpy()) if metric is not None else None}[norm.norm]
    floor = np.percentile(n, norm.floor) if norm.floor is not None else 0.0
    return exact, n, exact / np.maximum(n, max(floor, TINY * np.median(n))) ** norm.power


@pytest.mark.parametrize("method, spec", [("multi-stage", "gradient"), ("multi-stage", "metric^0.5"),
                                          ("multi-stage", "whitened@median"), ("single-stage", "gradient^0.5@q25"),
                                          ("pt-inverse-dropped", "metric"), ("gradient-dot", "gradient")])
def test_exhaustive_normalised_ranking_equals_explicit(tracer, method, spec):
    norm = Normalization.parse(spec)
    exact, n, normalized = _explicit(tracer, method, norm)
    trace = tracer.trace(QUESTION, ANSWER, method, top_k=8, exhaustive=True, heatmaps=False, normalization=spec)
    positive = [int(i) for i in np.argsort(-normalized, kind="stable")[:8] if normalized[i] > 0]
    assert [h.doc_id for h in trace.proponents] == positive
    for hit in trace.proponents + trace.opponents:
        assert hit.score == pytest.approx(exact[hit.doc_id], rel=1e-9)  # the exact influence stays beside it
        assert hit.normalized_score == pytest.approx(normalized[hit.doc_id], rel=1e-9)
        assert hit.norm == pytest.approx(n[hit.doc_id], rel=1e-6)
        assert np.sign(hit.normalized_score) == np.sign(hit.score)
    assert trace.settings.normalization == str(norm) and "divided by" in trace.settings.ranked_by
    raw = tracer.trace(QUESTION, ANSWER, method, top_k=8, exhaustive=True, heatmaps=False, normalization="none")
    assert [h.doc_id for h in raw.proponents] == [int(i) for i in np.argsort(-exact)[:8] if exact[i] > 0]
    assert all(h.normalized_score is None for h in raw.proponents)


@pytest.mark.parametrize("method, spec", [("multi-stage", "whitened"), ("multi-stage", "gradient^0.5"),
                                          ("multi-stage", "metric"), ("gradient-dot", "gradient@median")])
def test_the_index_serves_the_normalised_ranking(tracer, method, spec, monkeypatch):
    """With a candidate pool as large as the corpus the served ranking is the exhaustive one exactly;
    with the study's own pool its top documents are found among the exhaustive top."""
    exhaustive = tracer.trace(QUESTION, ANSWER, method, top_k=5, exhaustive=True, heatmaps=False, normalization=spec)
    influence = replace(tracer.study.config.influence, candidates=len(tracer.study.documents))
    monkeypatch.setattr(tracer.study.config, "influence", influence)
    served = tracer.trace(QUESTION, ANSWER, method, top_k=5, heatmaps=False, normalization=spec)
    assert "index candidates" in served.settings.retrieval
    for got, want in ((served.proponents, exhaustive.proponents), (served.opponents, exhaustive.opponents)):
        assert [h.doc_id for h in got] == [h.doc_id for h in want]
        for a, b in zip(got, want):
            assert a.normalized_score == pytest.approx(b.normalized_score, rel=1e-6)
            assert a.score == pytest.approx(b.score, rel=1e-6)


def test_refusals(tracer):
    with pytest.raises(ValueError, match="floor under the metric norm"):
        tracer.trace(QUESTION, ANSWER, "multi-stage", heatmaps=False, normalization="metric@median")
    with pytest.raises(ValueError, match="takes no normalisation"):
        tracer.trace(QUESTION, ANSWER, "gradient-cosine", heatmaps=False, normalization="gradient")
    with pytest.raises(ValueError, match="whitened norms are stored for documents at theta_pt"):
        tracer.trace(QUESTION, ANSWER, "single-stage", heatmaps=False, normalization="whitened")
    assert tracer.trace(QUESTION, ANSWER, "bm25", heatmaps=False).settings.normalization == "none"


def test_fine_tuning_records_take_the_same_choice(tracer):
    raw = tracer.finetune_examples(QUESTION, ANSWER, top_k=4, heatmaps=False, normalization="none")
    norm = tracer.finetune_examples(QUESTION, ANSWER, top_k=4, heatmaps=False, normalization="gradient")
    scores, norms = np.array(norm.pool_scores), np.array(norm.pool_norms)
    expected = [int(i) for i in np.argsort(-scores / norms)[:4] if scores[i] > 0]
    assert [h.record_id for h in norm.proponents] == expected
    assert raw.pool_scores == pytest.approx(norm.pool_scores)
    assert all(h.normalized_score == pytest.approx(h.score / h.norm) for h in norm.proponents + norm.opponents)


def test_exports_keep_the_exact_score_beside_the_normalised_one(tracer):
    trace = tracer.trace(QUESTION, ANSWER, "multi-stage", top_k=3, heatmaps=False, normalization="gradient^0.5")
    frame = export.hits_frame(trace)
    assert {"score", "normalized_score", "norm", "ranked_by"} <= set(frame.columns)
    assert (frame["ranked_by"] == "gradient^0.5").all()
    np.testing.assert_allclose(frame["normalized_score"], frame["score"] / frame["norm"] ** 0.5, rtol=1e-6)
    data = json.loads(export.to_json(trace))
    assert data["settings"]["normalization"] == "gradient^0.5"
    assert all(p["score"] > 0 and p["normalized_score"] > 0 for p in data["proponents"])

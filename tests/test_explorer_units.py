"""The explorer's pure parts: heatmap HTML (escaping, colours, hover values), charts, export."""

from __future__ import annotations

import html
import io
import re

import numpy as np
import pandas as pd
import pytest
import torch

from engine import Factors, LayerFactors
from explorer import charts, export
from explorer.heatmap import colour, format_score, heatmap_html, peak_window, snippet, symmetric_scale, token_spans
from explorer.results import DocumentHit, Timings, Trace, TraceSettings

SPAN = re.compile(r'<span class="msif-tok" style="background:([^"]+)" title="([^"]*)">(.*?)</span>', re.S)


def test_colour_encodes_sign_and_magnitude():
    assert colour(2.0, 4.0) == "rgba(33,102,172,0.425)"  # half the scale, blue
    assert colour(-4.0, 4.0) == "rgba(178,24,43,0.850)"  # full scale, red
    assert colour(-9.0, 4.0) == colour(-4.0, 4.0)  # clipped
    assert colour(0.0, 4.0) == colour(1.0, 0.0) == colour(float("nan"), 1.0) == "transparent"


def test_every_token_is_escaped_and_carries_its_value():
    tokens = ["<script>alert(1)</script>", ' "quoted" & ', "\n", "plain"]
    scores = [0.5, -0.25, 0.0, 1e-7]
    spans = SPAN.findall(token_spans(tokens, scores))
    assert len(spans) == 4
    assert "<script>" not in token_spans(tokens, scores)
    for (_background, title, body), token, score in zip(spans, tokens, scores):
        assert html.unescape(body) == token
        assert html.unescape(title).endswith(f"influence {format_score(score)}")
        assert '"' not in title and "<" not in title
    assert spans[0][0] == colour(0.5, 0.5) and spans[1][0] == colour(-0.25, 0.5)


def test_heatmap_rejects_mismatched_lengths_and_shares_scale():
    with pytest.raises(ValueError, match="2 tokens but 1 scores"):
        heatmap_html(["a", "b"], [1.0])
    assert symmetric_scale([0.1, -3.0, float("inf")]) == 3.0
    fixed = SPAN.findall(token_spans(["a"], [1.0], scale=4.0))
    assert fixed[0][0] == colour(1.0, 4.0)


def test_snippet_is_centred_on_the_peak():
    scores = [0.0] * 100
    scores[70] = -5.0
    assert peak_window(scores, 10) == (65, 75)
    assert peak_window(scores[:8], 10) == (0, 8)
    tokens = [f"t{i} " for i in range(100)]
    text = snippet("unused", tokens, scores, width=10)
    assert text.startswith("… t65") and text.endswith("t74 …")
    assert snippet("a  b\n" * 100, [], [], chars=10) == "a b a b a …"


def test_top_k_overlap_counts_shared_documents():
    table = charts.top_k_overlap({"a": [1, 2, 3, 4], "b": [4, 3, 9, 8], "c": [1, 2]})
    assert table.loc["a", "a"] == 1.0
    assert table.loc["a", "b"] == table.loc["b", "a"] == 0.5
    assert table.loc["a", "c"] == 1.0  # k = 2, the shorter list
    assert table.loc["b", "c"] == 0.0


def test_charts_carry_the_numbers():
    values = np.array([[1.0, -2.0], [0.5, 0.25]])
    fig = charts.layer_contributions(["d1", "d2"], ["l0", "l1"], values)
    assert np.allclose(np.array(fig.data[0].z), values) and fig.data[0].zmid == 0
    fig = charts.token_matrix(["a", "a"], ["x", "y", "z"], np.arange(6.0).reshape(2, 3), "m")
    assert list(fig.layout.yaxis.ticktext) == ["a", "a"] and np.shape(fig.data[0].z) == (2, 3)
    fig = charts.score_distribution([1.0, 2.0, -1.0], [2.0, -1.0], "pool")
    assert list(fig.data[0].x) == [1.0, 2.0, -1.0] and list(fig.data[1].x) == [2.0, -1.0]


def test_chart_labels_are_escaped():
    fig = charts.layer_contributions(["<b>doc</b>"], ["l0"], np.ones((1, 1)))
    assert list(fig.data[0].y) == ["&lt;b&gt;doc&lt;/b&gt;"]
    fig = charts.token_matrix(["<a>"], ["<br>", "x"], np.ones((1, 2)), "m")
    assert list(fig.layout.xaxis.ticktext) == ["&lt;br&gt;", "x"] and "<a>" not in str(fig.data[0].text)


def _trace() -> Trace:
    pro = DocumentHit(7, 2.5, "Ada <b>", "Ada was born in Brisk.", ["Ada", " was", " born"],
                      [0.5, 1.5, 0.5], {"l0": 2.0, "l1": 0.5}, 2.4)
    opp = DocumentHit(3, -1.0, "Bo", "Bo, a, b", ["Bo", ","], [-1.5, 0.5], {"l0": -1.0, "l1": 0.0})
    return Trace("Where?", "In Brisk.", "multi-stage", [pro], [opp], ["In", " Brisk", "."],
                 TraceSettings(0.1, 1, {}, "exact, all documents", "Where?", ""), Timings(total=1.0),
                 [7, 3, 5], [2.5, -1.0, 0.1], [9.0, 4.0, 1.0])


def test_export_round_trips_scores():
    trace = _trace()
    frame = pd.read_csv(io.BytesIO(export.to_csv(trace)))
    assert list(frame["sign"]) == ["proponent", "opponent"]
    assert list(frame["doc_id"]) == [7, 3] and list(frame["score"]) == [2.5, -1.0]
    assert frame.loc[0, "top_tokens"].startswith("' was':+1.5")
    data = __import__("json").loads(export.to_json(trace))
    assert data["proponents"][0]["token_scores"] == [0.5, 1.5, 0.5]
    assert data["proponents"][0]["text"] == "Ada was born in Brisk." and data["pool_scores"][2] == 0.1


def test_spectrum_is_the_sorted_eigenvalues():
    lam = torch.tensor([[3.0, 1.0, 0.5], [9.0, 0.0, 2.0]], dtype=torch.float64)
    factors = Factors("ekfac", {"l": LayerFactors(corrected_eigenvalues=lam)}, 1, 1, {})
    ranks, values = factors.spectrum("l")
    assert list(ranks) == [1, 2, 3, 4, 5, 6] and list(values) == [9.0, 3.0, 2.0, 1.0, 0.5, 0.0]
    ranks, values = factors.spectrum("l", points=3)
    assert list(ranks) == [1, 2, 6]  # log-spaced: 1, sqrt(6), 6
    assert values[0] == 9.0 and values[-1] == 0.0 and np.all(np.diff(values) <= 0)
    assert list(values) == [sorted(lam.flatten().tolist(), reverse=True)[int(r) - 1] for r in ranks]


@pytest.mark.parametrize("value, digits, shown", [
    (3926.08, 3, "+3,926"), (-3926.08, 4, "-3,926"), (0.01234, 3, "+0.0123"), (12.34, 3, "+12.3"),
    (3.93e7, 3, "+3.93×10⁷"), (-1.2e-5, 3, "-1.20×10⁻⁵"), (9.996, 3, "+10.0"), (999999.6, 3, "+1.00×10⁶"),
    (0.0, 3, "0"), (float("nan"), 3, "nan"),
])
def test_scores_read_at_a_glance(value, digits, shown):
    assert format_score(value, digits) == shown

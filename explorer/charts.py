"""Plotly figures for the explorer. Pure functions of plain data (no Streamlit, no engine); numbers in
hovers read as everywhere else in the app (``heatmap.format_score``).

Plotly reads a few HTML tags in text (<b>, <br>, <a>), so every label that comes from a
document, a token or a title is escaped first.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .heatmap import format_score

DIVERGING = "RdBu"  # red = negative (opponent), blue = positive (proponent), as in the heatmaps
LAYOUT = dict(template="plotly_white", margin=dict(l=10, r=10, t=50, b=10))


def score_distribution(pool_scores: Sequence[float], top_scores: Sequence[float], pool_label: str) -> go.Figure:
    """Histogram of exact scores of every document scored, with the shown documents as a rug."""
    fig = go.Figure()
    fig.add_histogram(x=list(pool_scores), nbinsx=60, name=pool_label, marker_color="#9aa7b4")
    fig.add_scatter(x=list(top_scores), y=[0] * len(top_scores), mode="markers", name="shown documents",
                    marker=dict(symbol="line-ns-open", size=16, color=["#2166ac" if s > 0 else "#b2182b"
                                                                       for s in top_scores]))
    fig.add_vline(x=0, line_dash="dot", line_color="#666")
    fig.update_layout(title="Influence scores", xaxis_title="influence on the answer's log-likelihood",
                      yaxis_title="documents", bargap=0.02, **LAYOUT)
    return fig


def score_against_norm(norms: Sequence[float], scores: Sequence[float], shown: Sequence[int],
                       pool_label: str, norm_label: str) -> go.Figure:
    """Exact score against the document's norm for every document scored (log norm axis), the shown
    ones marked: a ranking driven by norms shows as the shown documents sitting at the right."""
    norms, scores = np.asarray(norms, float), np.asarray(scores, float)
    marked = np.zeros(len(norms), bool)
    marked[list(shown)] = True
    hover = np.array([f"norm {format_score(n, signed=False)}<br>score {format_score(v)}"
                      for n, v in zip(norms, scores)], dtype=object)
    fig = go.Figure()
    fig.add_scattergl(x=norms[~marked], y=scores[~marked], mode="markers", name=pool_label,
                      marker=dict(size=4, color="#9aa7b4", opacity=0.6), text=list(hover[~marked]),
                      hovertemplate="%{text}<extra></extra>")
    fig.add_scattergl(x=norms[marked], y=scores[marked], mode="markers", name="shown documents",
                      marker=dict(size=9, color=["#2166ac" if v > 0 else "#b2182b" for v in scores[marked]]),
                      text=list(hover[marked]), hovertemplate="%{text}<extra></extra>")
    fig.add_hline(y=0, line_dash="dot", line_color="#666")
    fig.update_layout(title="Score against document norm", xaxis_title=norm_label, xaxis_type="log",
                      yaxis_title="exact influence", **LAYOUT)
    return fig


def layer_contributions(labels: Sequence[str], layer_names: Sequence[str], values: np.ndarray) -> go.Figure:
    """Documents (rows) x tracked layers (columns): each row sums to the document's score."""
    values = np.asarray(values, dtype=float)
    bound = float(np.abs(values).max()) if values.size else 1.0
    fig = go.Figure(go.Heatmap(z=values, x=list(layer_names), y=[html.escape(label) for label in labels],
                               colorscale=DIVERGING, text=[[format_score(v) for v in row] for row in values],
                               zmid=0, zmin=-bound, zmax=bound, colorbar=dict(title="score"),
                               hovertemplate="%{y}<br>%{x}: %{text}<extra></extra>"))
    fig.update_layout(title="Per-layer contribution of the top documents", xaxis_tickangle=-45,
                      yaxis_autorange="reversed", height=max(300, 28 * len(labels) + 160), **LAYOUT)
    return fig


def top_k_overlap(rankings: Mapping[str, Sequence[int]]) -> pd.DataFrame:
    """|top-k(a) ∩ top-k(b)| / k for every pair of methods (k = the shorter list's length)."""
    names = list(rankings)
    table = pd.DataFrame(index=names, columns=names, dtype=float)
    for a in names:
        for b in names:
            k = min(len(rankings[a]), len(rankings[b]))
            table.loc[a, b] = len(set(rankings[a][:k]) & set(rankings[b][:k])) / k if k else np.nan
    return table


def overlap_heatmap(overlap: pd.DataFrame, k: int) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=overlap.values, x=list(overlap.columns), y=list(overlap.index),
                               zmin=0, zmax=1, colorscale="Blues", text=overlap.values,
                               texttemplate="%{text:.0%}", colorbar=dict(title="overlap"),
                               hovertemplate="%{y} vs %{x}: %{z:.0%}<extra></extra>"))
    fig.update_layout(title=f"Overlap of the top-{k} proponents", yaxis_autorange="reversed",
                      height=420, **LAYOUT)
    return fig


def rank_table(rankings: Mapping[str, Sequence[int]], titles: Mapping[int, str]) -> pd.DataFrame:
    """One column per method: the documents it ranks 1..k, as 'doc id · title'."""
    k = max((len(r) for r in rankings.values()), default=0)
    cols = {m: [f"{d} · {titles.get(d, '')}" for d in r] + [""] * (k - len(r)) for m, r in rankings.items()}
    return pd.DataFrame(cols, index=pd.RangeIndex(1, k + 1, name="rank"))


def token_matrix(row_tokens: Sequence[str], col_tokens: Sequence[str], matrix: np.ndarray,
                 title: str) -> go.Figure:
    """Answer tokens (rows) x document tokens (columns). Tokens repeat, so axes are positions with
    the token text as tick labels and in the hover."""
    matrix = np.asarray(matrix, dtype=float)
    bound = float(np.abs(matrix).max()) if matrix.size else 1.0
    rows = [html.escape(f"{i}: {t!r}") for i, t in enumerate(row_tokens)]
    cols = [html.escape(f"{j}: {t!r}") for j, t in enumerate(col_tokens)]
    hover = [[f"answer {r}<br>document {c}<br>{format_score(v)}" for c, v in zip(cols, values)]
             for r, values in zip(rows, matrix)]
    fig = go.Figure(go.Heatmap(z=matrix, colorscale=DIVERGING, zmid=0, zmin=-bound, zmax=bound,
                               text=hover, hovertemplate="%{text}<extra></extra>",
                               colorbar=dict(title="score")))
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(cols))),
                     ticktext=[_tick(t) for t in col_tokens], tickangle=-60, tickfont_size=9)
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(rows))),
                     ticktext=[_tick(t) for t in row_tokens], autorange="reversed")
    fig.update_layout(title=title, height=max(320, 22 * len(rows) + 200), **LAYOUT)
    return fig


def _tick(token: str) -> str:
    return html.escape(repr(token)[1:-1])


def spectra(curves: Mapping[str, Mapping[str, tuple]], layers: Sequence[str],
            alpha: float | None = None) -> go.Figure:
    """Eigenvalues by rank (log-log), one panel per stage; dashed lines = each layer's damping
    lambda; the black dotted line on the fine-tuned panel = alpha, multi-stage's damping there."""
    stages = list(curves)
    fig = make_subplots(rows=1, cols=len(stages), subplot_titles=stages, shared_yaxes=True)
    palette = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]
    for col, stage in enumerate(stages, start=1):
        for i, layer in enumerate(layers):
            ranks, values, damping = curves[stage][layer]
            color = palette[i % len(palette)]
            positive = np.asarray(values) > 0
            fig.add_scatter(x=np.asarray(ranks)[positive], y=np.asarray(values)[positive], mode="lines",
                            name=layer, legendgroup=layer, showlegend=col == 1, line_color=color,
                            row=1, col=col)
            fig.add_hline(y=damping, line_dash="dash", line_color=color, opacity=0.6, row=1, col=col)
    if alpha is not None and "fine-tuned" in stages:
        fig.add_hline(y=alpha, line_dash="dot", line_color="black", annotation_text=f"α = {alpha:.3g}",
                      row=1, col=stages.index("fine-tuned") + 1)
    fig.update_xaxes(type="log", title_text="rank")
    fig.update_yaxes(type="log")
    fig.update_yaxes(title_text="eigenvalue", col=1)
    fig.update_layout(title="Approximate Fisher spectra (dashed: damping λ)", height=460, **LAYOUT)
    return fig


def histogram(values: Sequence[float], title: str, x_title: str) -> go.Figure:
    fig = go.Figure(go.Histogram(x=list(values), nbinsx=40, marker_color="#7b8ea3"))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title="count", height=320, **LAYOUT)
    return fig


def bar(values: pd.Series, title: str) -> go.Figure:
    fig = go.Figure(go.Bar(x=[str(i) for i in values.index], y=values.values, marker_color="#7b8ea3"))
    fig.update_layout(title=title, yaxis_title=values.name or "", height=320, **LAYOUT)
    return fig

"""Streamlit pieces shared by the pages: ranked document lists and their heatmaps."""

from __future__ import annotations

import re
from collections.abc import Sequence

import streamlit as st

from engine.methods import method as method_spec

from .heatmap import format_score, heatmap_html, legend_html, snippet, symmetric_scale, text_html
from .results import DocumentHit, Hit, Trace

POSITION_NOTE = ("A token's colour is the influence credited to the position that *reads* it and "
                 "predicts the next token, so in “born in Ardwick” the town's influence often lights "
                 "up “in”. Token scores add up to the document's score.")


def plain(text: str, limit: int = 90) -> str:
    """Text for a Markdown label (expander titles): one line, Markdown characters escaped."""
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[:limit].rstrip() + "…"
    return re.sub(r"([\\`*_{}\[\]<>()#+\-.!|~$])", r"\\\1", text)


def answer_block(answer: str) -> None:
    st.html(text_html(answer))


def _heading(hit: Hit) -> tuple[str, str, int]:
    """(title, unit, id) of a ranked document or fine-tuning record."""
    if isinstance(hit, DocumentHit):
        return hit.title, "doc", hit.doc_id
    return hit.instruction, "record", hit.record_id


def hit_list(hits: Sequence[Hit], kind: str, method: str, shared_scale: bool,
             lowers: str = "lowers the answer's log-likelihood") -> None:
    """Ranked hits: rank, score, title, metadata and a snippet around the heatmap's peak, then the
    token heatmap in an expander."""
    if not hits:
        st.caption("None: no scored document has this sign of influence.")
        return
    scale = max((symmetric_scale(h.token_scores) for h in hits), default=0.0) if shared_scale else None
    for rank, hit in enumerate(hits, start=1):
        title, unit, number = _heading(hit)
        with st.container(border=True):
            shown = hit.score if hit.normalized_score is None else hit.normalized_score
            st.markdown(f"**#{rank}** · `{format_score(shown)}` · {plain(title or '(untitled)')} "
                        f"· {unit} {number}")
            baseline = method_spec(method).is_baseline
            meta = [f"{'similarity' if baseline else 'exact influence'} {format_score(hit.score, 4)}"]
            if hit.normalized_score is not None:
                meta = [f"normalised {format_score(hit.normalized_score)}", *meta,
                        f"norm {format_score(hit.norm, signed=False)}"]
            if hit.percentile is not None:
                meta.append(f"percentile {hit.percentile:.1f} of {hit.scored:,} scored")
            if hit.tokens:
                meta.append(f"{len(hit.tokens)} tokens")
            st.caption(" · ".join(meta) + "  \n" + plain(snippet(hit.text, hit.tokens, hit.token_scores), 400))
            if not hit.tokens:
                if method_spec(method).is_baseline:
                    st.caption(f"{method} is a similarity baseline: it has no token heatmap.")
                continue
            # Only open expanders build their heatmap (on_change="rerun"): 20 heatmaps of 256 tokens
            # are ~0.5 MB of HTML, which the browser needs about a second to take in.
            box = st.expander("Token heatmap", expanded=rank == 1, key=f"{unit}-{kind}-{rank}",
                              on_change="rerun")
            if box.open:
                with box:
                    st.html(heatmap_html(hit.tokens, hit.token_scores, scale))
                    st.html(legend_html(scale if scale is not None else symmetric_scale(hit.token_scores), lowers))


def measured(trace: Trace) -> str:
    """What a trace's influence scores are on, in words."""
    if trace.versus is not None:
        return "the answer's log-likelihood relative to the other's"
    if trace.span is not None:
        return "the picked tokens' log-likelihood"
    return "the answer's log-likelihood"


def side_titles(trace: Trace) -> tuple[str, str] | None:
    """The columns' titles for what a trace's scores measure (None: the whole answer's log-likelihood)."""
    if trace.versus is not None:
        return ("Proponents: make the answer more likely than the other",
                "Opponents: make the other answer more likely")
    if trace.span is not None:
        return ("Proponents: raise the picked tokens' log-likelihood", "Opponents: lower it")
    return None


def ranked_columns(proponents: Sequence[Hit], opponents: Sequence[Hit], method: str, shared_scale: bool,
                   trace: Trace | None = None) -> None:
    """Proponents and opponents side by side, titled by what ``trace``'s scores measure."""
    titles = None if trace is None else side_titles(trace)
    lowers = "lowers " + (measured(trace) if trace is not None else "the answer's log-likelihood")
    pro_title, opp_title = titles or (("Most similar", "Least similar") if method_spec(method).is_baseline else
                                      ("Proponents: raise the answer's log-likelihood", "Opponents: lower it"))
    left, right = st.columns(2)
    with left:
        st.subheader(pro_title)
        hit_list(proponents, "proponents", method, shared_scale, lowers)
    with right:
        st.subheader(opp_title)
        hit_list(opponents, "opponents", method, shared_scale, lowers)

"""Trace an answer: prompt -> answer -> ranked pretraining documents with token heatmaps."""

from __future__ import annotations

from urllib.parse import urlencode

import numpy as np
import streamlit as st

from engine.methods import ALL_METHODS, COMPARED, DESCRIPTIONS
from engine.methods import method as method_spec
from engine.query import Target
from explorer import charts, export
from explorer.heatmap import format_score, heatmap_html, legend_html, symmetric_scale
from explorer.results import Trace
from explorer.session import (
    RANKINGS,
    format_span,
    get_tracer,
    ranking_label,
    restore_from_url,
    share_fields,
    share_in_url,
    show_error,
)
from explorer.tracer import MAX_PROMPT_CHARS
from explorer.widgets import POSITION_NOTE, answer_block, plain, ranked_columns

tracer = get_tracer()
auto_run = restore_from_url()

with st.sidebar:
    st.header("Settings")
    method = st.selectbox("Method", ALL_METHODS, key="method",
                          help="\n\n".join(f"**{m}**: {h}" for m, h in DESCRIPTIONS.items()))
    normalize = st.selectbox("Rank by", RANKINGS, key="normalize", format_func=ranking_label,
                             disabled=not method_spec(method).normalizable,
                             help="Raw influence grows with a document's gradient, so among many documents a few "
                                  "with huge gradients top every ranking. A normalised ranking divides each exact "
                                  "score by a norm of the document (to a power, or with a floor at the corpus "
                                  "median); the exact score is always shown beside it. The default was chosen "
                                  "by the multi-seed haystack benchmark (docs/normalization.md).")
    top_k = st.slider("Documents per side", 1, 50, 10, key="top_k")
    exhaustive = st.checkbox("Score every document exactly", key="exhaustive",
                             help="Skip the index and score the whole corpus: the reference ranking "
                                  "(slower). By default the index proposes candidates that are then "
                                  "re-scored exactly; only exact scores are ever shown.")
    shared_scale = st.checkbox("One colour scale for all documents", key="shared_scale")
    st.subheader("Generation")
    max_new_tokens = st.slider("Max new tokens", 4, 128, 48, key="max_new_tokens")
    temperature = st.slider("Temperature (0 = greedy)", 0.0, 1.5, 0.0, 0.05, key="temperature")

st.title("Why did the model say that?")
st.caption("Type a prompt for the fine-tuned model. It answers, and the multi-stage influence "
           "function ranks the pretraining documents that made that answer more (or less) likely.")

with st.form("ask"):
    instruction = st.text_area("Prompt", key="instruction", max_chars=MAX_PROMPT_CHARS, height=90,
                               placeholder="e.g. Where was Nelel Wexford born?")
    with st.expander("Context, answer and contrast (optional)",
                     expanded=bool(st.session_state.get("versus") or st.session_state.get("typed_answer"))):
        context = st.text_area("Context (the dolly template's input field)", key="context", height=70)
        typed_answer = st.text_area("Answer to trace (leave empty and the model answers)",
                                    key="typed_answer", height=70)
        versus = st.text_area("Rather than (optional): another answer, to ask why the model gives its answer "
                              "rather than this one", key="versus", height=70,
                              help="Documents are then ranked by their influence on log p(answer) − log p(this "
                                   "answer): proponents make the model's answer more likely relative to this one.")
    submitted = st.form_submit_button("Trace", type="primary")

with st.expander("The prompt the model sees"):
    st.code(tracer.study.config.template, language=None)


def run_trace(instruction: str, answer: str | None, context: str, versus: str | None,
              span: tuple[int, int] | None = None) -> Trace | None:
    with st.status("Tracing…", expanded=False) as status:
        def on_stage(message: str) -> None:
            status.update(label=f"{message}…")
            st.write(message)
        try:
            trace = tracer.trace(instruction, answer or None, method, top_k, context,
                                 exhaustive=exhaustive, on_stage=on_stage,
                                 max_new_tokens=max_new_tokens, temperature=temperature,
                                 normalization=normalize if method_spec(method).normalizable else None,
                                 versus=versus or None, span=span)
        except Exception as err:  # noqa: BLE001 - shown as one line; the status must not keep spinning
            status.update(label="Could not trace", state="error", expanded=True)
            show_error(err, "Could not trace")
            return None
        status.update(label=f"Traced in {trace.timings.total:.2f} s", state="complete")
    return trace


def keep(result: Trace | None) -> None:
    """A new trace replaces the last one, and the page's address now restores it."""
    if result is None:
        return
    for stale in ("inspect", "maps", "span_pick", "lookups"):  # per-trace state of the tabs and the answer
        st.session_state.pop(stale, None)
    st.session_state["trace"] = result
    share_in_url(result)


def url_span() -> tuple[int, int] | None:
    text = st.session_state.pop("span", "")
    return Target.parse_span(text) if text else None


if submitted or auto_run:
    keep(run_trace(instruction, typed_answer, context, versus, url_span() if auto_run else None))


def pick_span(trace: Trace) -> None:
    """The answer's tokens as buttons: pick one, or the first and last of a span, and re-rank the
    documents by their influence on those tokens alone."""
    if trace.versus is not None:
        st.caption("A contrastive trace compares two whole answers; clear “Rather than” to rank by a span of tokens.")
        return
    pieces = [p.strip() or repr(p)[1:-1] or "␣" for p in trace.answer_tokens]
    chosen = list(range(*trace.span)) if trace.span else []
    picked = st.pills("Answer tokens: pick one, or the first and last of a span, then rank by them",
                      list(range(len(pieces))), selection_mode="multi", default=chosen,
                      format_func=lambda i: pieces[i], key="span_pick")
    left, right = st.columns([1, 3])
    span = (min(picked), max(picked) + 1) if picked else None
    if left.button("Rank by the picked tokens", disabled=span is None or span == tuple(trace.span or ()),
                   key="rank_span"):
        keep(run_trace(trace.prompt, trace.answer, trace.settings.context, None, span))
        st.rerun()
    if trace.span is not None and right.button("Rank by the whole answer", key="whole_answer"):
        keep(run_trace(trace.prompt, trace.answer, trace.settings.context, None))
        st.rerun()


def inspect_tab(trace: Trace) -> None:
    if method_spec(trace.method).is_baseline:
        st.info("Token maps need an influence method; baselines only rank documents.")
        return
    hits = trace.proponents + trace.opponents
    if not hits:
        st.info("No document to inspect.")
        return
    labels = [f"{side} #{rank} · doc {h.doc_id} · {h.title[:60]}"
              for side, group in (("proponent", trace.proponents), ("opponent", trace.opponents))
              for rank, h in enumerate(group, start=1)]
    choice = st.selectbox("Document", range(len(hits)), format_func=lambda i: labels[i], key="inspect")
    hit = hits[choice]
    cache = st.session_state.setdefault("maps", {})
    key = (trace.settings.model_prompt, trace.answer, trace.method, hit.doc_id, trace.versus)
    if key not in cache:
        with st.spinner("Splitting the influence over answer tokens…"):
            cache[key] = tracer.answer_token_map(*key)
    data = cache[key]
    matrix = data.matrix
    per_answer_token = matrix.sum(axis=1)
    shown = "document score" if trace.span is None else f"its score on tokens {format_span(trace.span)}"
    st.markdown(f"**Which answer tokens this document supports** (sum {format_score(per_answer_token.sum())}; "
                f"{shown} {format_score(hit.score)})")
    n = len(data.answer_tokens)
    scale = symmetric_scale(per_answer_token.tolist())
    st.html(heatmap_html(data.answer_tokens, per_answer_token[:n].tolist(), scale, label="support"))
    if data.versus_tokens:
        st.markdown("**…rather than** (each token's influence on log p(rather-than answer), negated: it adds to the "
                    "contrast)")
        st.html(heatmap_html(data.versus_tokens, per_answer_token[n:].tolist(), scale, label="support"))
    st.html(legend_html(scale))
    st.markdown("**The document's tokens**")
    st.html(heatmap_html(data.document_tokens, matrix.sum(axis=0).tolist()))
    st.plotly_chart(charts.token_matrix(data.row_tokens, data.document_tokens, matrix,
                                        "Answer token × document token influence"),
                    key=f"matrix-{hit.doc_id}")
    st.caption("Each row is the influence of this document on one answer token's log-probability; "
               "rows sum to the answer heatmap above, columns to the document heatmap. " + POSITION_NOTE)


def charts_tab(trace: Trace) -> None:
    hits = trace.proponents + trace.opponents
    pool = trace.settings.retrieval
    st.plotly_chart(charts.score_distribution(trace.pool_scores, [h.score for h in hits],
                                              f"{len(trace.pool_scores)} documents scored"),
                    key="distribution")
    st.caption(f"Exact scores of every document that was scored ({pool}). With the index, that is "
               "the candidate pool, not the whole corpus; tick “Score every document exactly” for "
               "the full distribution.")
    if trace.pool_norms:
        shown = {h.doc_id for h in hits}
        norm = trace.settings.normalization.split("^")[0].split("@")[0]
        label = {"none": "gradient norm |∇l(z)|", "gradient": "gradient norm |∇l(z)|", "metric":
                 "norm in the inverse's metric", "whitened": "whitened norm"}.get(norm, norm)
        st.plotly_chart(charts.score_against_norm(trace.pool_norms, trace.pool_scores,
                                                  [i for i, d in enumerate(trace.pool_ids) if d in shown],
                                                  f"{len(trace.pool_ids)} documents scored", label),
                        key="norms")
        st.caption("Each document's exact influence against its norm. When the shown documents sit at the far "
                   "right, norms drive the ranking (raw influence grows with the gradient); a normalised "
                   f"ranking ({trace.settings.ranked_by}) corrects for that.")
    with_layers = [h for h in hits if h.layer_scores]
    if with_layers:
        layers = list(with_layers[0].layer_scores)
        values = np.array([[h.layer_scores[name] for name in layers] for h in with_layers])
        labels = [f"{'+' if h.score > 0 else '−'} doc {h.doc_id}: {h.title[:28]}" for h in with_layers]
        st.plotly_chart(charts.layer_contributions(labels, layers, values), key="layers")


def compare_tab(trace: Trace) -> None:
    st.caption("Ranks the same answer with each method and measures how much their top-k agree. "
               "single-stage scores every document exactly (no index), so it takes longest.")
    key = (trace.prompt, trace.answer, len(trace.proponents), trace.settings.model_prompt)
    comparison = st.session_state.get("comparison")
    if st.button("Compare methods", key="compare"):
        rankings, timings = {}, {}
        progress = st.progress(0.0, text="Comparing methods…")
        for i, m in enumerate(COMPARED):
            progress.progress(i / len(COMPARED), text=f"Ranking by {m}…")
            other = trace if m == trace.method else tracer.trace(
                trace.prompt, trace.answer, m, len(trace.proponents), context=trace.settings.context,
                heatmaps=False)
            rankings[m] = [h.doc_id for h in other.proponents]
            timings[m] = other.timings.rank
        progress.empty()
        titles = {int(d): tracer.study.documents[int(d)]["title"] for r in rankings.values() for d in r}
        comparison = st.session_state["comparison"] = {"key": key, "rankings": rankings,
                                                       "timings": timings, "titles": titles}
    if not comparison or comparison["key"] != key:
        return
    overlap = charts.top_k_overlap(comparison["rankings"])
    st.plotly_chart(charts.overlap_heatmap(overlap, len(trace.proponents)), key="overlap")
    st.dataframe(charts.rank_table(comparison["rankings"], comparison["titles"]))
    st.caption("Seconds to rank: " + ", ".join(f"{m} {t:.2f}" for m, t in comparison["timings"].items()))


def export_tab(trace: Trace) -> None:
    stem = f"msif-{trace.method}"
    left, middle, right = st.columns(3)
    left.download_button("Download CSV", export.to_csv(trace), f"{stem}.csv", "text/csv", key="csv")
    middle.download_button("Download JSON", export.to_json(trace), f"{stem}.json", "application/json",
                           key="json")
    right.download_button("Download JSONL for the TrackStar viewer", export.to_viewer_jsonl([trace]),
                          f"{stem}.jsonl", "application/jsonl", key="jsonl",
                          help="One query per line in the format of PAIR's TDA output viewer "
                               "(pair-code.github.io/pretraining-tda/demo): load the file there to browse it.")
    query = urlencode(share_fields(trace))
    st.markdown("**Share**: this page's address now restores the prompt, answer, contrast, method, ranking and "
                "span. Relative link:")
    st.code(f"?{query}", language=None)
    st.dataframe(export.hits_frame(trace).drop(columns=["prompt", "answer", "versus"]), hide_index=True)


def find_tab(trace: Trace) -> None:
    st.caption("Any document, for this answer: type words from it (BM25 over the corpus) or its id, and see its exact "
               "score, where it ranks among the scored documents, and its token heatmap.")
    words = st.text_input("Words from a document, or its id", key="find", placeholder="e.g. Ostgate market, or 17")
    if not words.strip():
        return
    try:
        ids = tracer.engine.find_documents(words)
    except ValueError as err:
        show_error(err, "Could not look it up")
        return
    if not ids:
        st.info("No document holds any of these words.")
        return
    documents = tracer.study.documents
    doc = st.selectbox("Document", ids, key="found",
                       format_func=lambda d: f"doc {d} · {documents[int(d)]['title'][:70]}")
    cache = st.session_state.setdefault("lookups", {})
    if doc not in cache:
        with st.spinner(f"Scoring document {doc}…"):
            try:
                cache[doc] = tracer.document(trace, int(doc))
            except Exception as err:  # noqa: BLE001 - one line on the page
                show_error(err, "Could not score the document")
                return
    found = cache[doc]
    hit = found.hit
    ranked = hit.score if hit.normalized_score is None else hit.normalized_score
    pool = ("one of the documents this trace scored" if found.in_pool else
            "not among the index's candidates: placed among them by its exact score")
    st.markdown(f"**doc {hit.doc_id} · {plain(hit.title or '(untitled)')}** · ranks {found.where()} of {hit.scored:,} "
                f"({pool}) · `{format_score(ranked)}`")
    kind = "similarity" if method_spec(trace.method).is_baseline else "exact influence"
    meta = [f"{kind} {format_score(hit.score, 4)}",
            f"percentile {hit.percentile:.1f}"]
    if hit.normalized_score is not None:
        meta.insert(0, f"normalised {format_score(hit.normalized_score)} (norm {format_score(hit.norm, signed=False)})")
    st.caption(" · ".join(meta))
    if hit.tokens:
        st.html(heatmap_html(hit.tokens, hit.token_scores))
        st.html(legend_html(symmetric_scale(hit.token_scores)))
    else:
        st.text(hit.text)


def documents_tab(trace: Trace) -> None:
    st.caption(POSITION_NOTE)
    ranked_columns(trace.proponents, trace.opponents, trace.method, shared_scale, trace)



TABS = {"Documents": documents_tab, "Inspect a document": inspect_tab, "Find any document": find_tab,
        "Charts": charts_tab, "Compare methods": compare_tab, "Export & share": export_tab}

trace: Trace | None = st.session_state.get("trace")
if trace is not None:
    st.subheader("Answer")
    answer_block(trace.answer)
    if trace.versus is not None:
        st.markdown("**…rather than**")
        answer_block(trace.versus)
    if not method_spec(trace.method).is_baseline:
        pick_span(trace)
    damping = trace.settings.damping
    st.caption(f"method **{trace.method}** · scores are influence on **{trace.settings.target}** · ranked by "
               f"**{trace.settings.ranked_by}** (scores in log-likelihood units; normalised ones keep their sign) · "
               f"{trace.settings.retrieval} · "
               f"{trace.timings.total:.2f} s · α = {trace.settings.alpha:.3g}"
               + (f" · λ from {min(damping.values()):.2g} to {max(damping.values()):.2g}" if damping else ""))
    if not method_spec(trace.method).is_baseline:
        st.caption(f"A raw score S is the first-order change in {trace.settings.target} (in nats) per unit of "
                   "upweighting the document in its training loss, the mean over the corpus: one more copy of it "
                   "among N documents is about 1/N of a unit, so it moves that log-likelihood by about S/N.")
    # Only the open tab runs (on_change="rerun"): the documents come first and fast.
    tabs = st.tabs(list(TABS), key="view", on_change="rerun")
    for tab, render in zip(tabs, TABS.values()):
        if tab.open:
            with tab:
                render(trace)

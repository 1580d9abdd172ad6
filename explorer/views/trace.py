"""Trace an answer: prompt -> answer -> ranked pretraining documents with token heatmaps."""

from __future__ import annotations

from urllib.parse import urlencode

import numpy as np
import streamlit as st

from engine.methods import ALL_METHODS, COMPARED, DESCRIPTIONS
from engine.methods import method as method_spec
from explorer import charts, export
from explorer.heatmap import heatmap_html, legend_html, symmetric_scale
from explorer.results import Trace
from explorer.session import RANKINGS, get_tracer, ranking_label, restore_from_url, share_in_url, show_error
from explorer.tracer import MAX_PROMPT_CHARS
from explorer.widgets import POSITION_NOTE, answer_block, ranked_columns

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
    with st.expander("Context and answer (optional)"):
        context = st.text_area("Context (the dolly template's input field)", key="context", height=70)
        typed_answer = st.text_area("Answer to trace (leave empty and the model answers)",
                                    key="typed_answer", height=70)
    submitted = st.form_submit_button("Trace", type="primary")

with st.expander("The prompt the model sees"):
    st.code(tracer.study.config.template, language=None)


def run_trace() -> Trace | None:
    with st.status("Tracing…", expanded=False) as status:
        def on_stage(message: str) -> None:
            status.update(label=f"{message}…")
            st.write(message)
        try:
            trace = tracer.trace(instruction, typed_answer or None, method, top_k, context,
                                 exhaustive=exhaustive, on_stage=on_stage,
                                 max_new_tokens=max_new_tokens, temperature=temperature,
                                 normalization=normalize if method_spec(method).normalizable else None)
        except Exception as err:  # noqa: BLE001 - shown as one line; the status must not keep spinning
            status.update(label="Could not trace", state="error", expanded=True)
            show_error(err, "Could not trace")
            return None
        status.update(label=f"Traced in {trace.timings.total:.2f} s", state="complete")
    return trace


if submitted or auto_run:
    result = run_trace()
    if result is not None:
        for stale in ("inspect", "maps"):  # per-trace state of the tabs
            st.session_state.pop(stale, None)
        st.session_state["trace"] = result
        share_in_url(result.prompt, result.answer, result.method, result.settings.normalization)


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
    key = (trace.settings.model_prompt, trace.answer, trace.method, hit.doc_id)
    if key not in cache:
        with st.spinner("Splitting the influence over answer tokens…"):
            cache[key] = tracer.answer_token_map(*key)
    data = cache[key]
    matrix = data.matrix
    per_answer_token = matrix.sum(axis=1)
    st.markdown(f"**Which answer tokens this document supports** (sum {per_answer_token.sum():+.4g}; "
                f"document score {hit.score:+.4g})")
    st.html(heatmap_html(data.answer_tokens, per_answer_token.tolist(), label="support"))
    st.html(legend_html(symmetric_scale(per_answer_token.tolist())))
    st.markdown("**The document's tokens**")
    st.html(heatmap_html(data.document_tokens, matrix.sum(axis=0).tolist()))
    st.plotly_chart(charts.token_matrix(data.answer_tokens, data.document_tokens, matrix,
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
    left, right = st.columns(2)
    left.download_button("Download CSV", export.to_csv(trace), f"{stem}.csv", "text/csv", key="csv")
    right.download_button("Download JSON", export.to_json(trace), f"{stem}.json", "application/json",
                          key="json")
    query = urlencode({"prompt": trace.prompt, "answer": trace.answer, "method": trace.method,
                       "normalize": trace.settings.normalization})
    st.markdown("**Share**: this page's address now restores the prompt, answer, method and ranking. "
                "Relative link:")
    st.code(f"?{query}", language=None)
    st.dataframe(export.hits_frame(trace).drop(columns=["prompt", "answer"]), hide_index=True)


def documents_tab(trace: Trace) -> None:
    st.caption(POSITION_NOTE)
    ranked_columns(trace.proponents, trace.opponents, trace.method, shared_scale)


TABS = {"Documents": documents_tab, "Inspect a document": inspect_tab, "Charts": charts_tab,
        "Compare methods": compare_tab, "Export & share": export_tab}

trace: Trace | None = st.session_state.get("trace")
if trace is not None:
    st.subheader("Answer")
    answer_block(trace.answer)
    damping = trace.settings.damping
    st.caption(f"method **{trace.method}** · ranked by **{trace.settings.ranked_by}** (scores in log-likelihood "
               "units; normalised ones keep their sign) · "
               f"{trace.settings.retrieval} · "
               f"{trace.timings.total:.2f} s · α = {trace.settings.alpha:.3g}"
               + (f" · λ from {min(damping.values()):.2g} to {max(damping.values()):.2g}" if damping else ""))
    # Only the open tab runs (on_change="rerun"): the documents come first and fast.
    tabs = st.tabs(list(TABS), key="view", on_change="rerun")
    for tab, render in zip(tabs, TABS.values()):
        if tab.open:
            with tab:
                render(trace)

"""The fine-tuning records most influential on the traced answer (single-stage influence)."""

from __future__ import annotations

import streamlit as st

from engine.methods import RECORDS_METHOD
from explorer import charts
from explorer.results import Trace
from explorer.session import get_tracer, show_error
from explorer.widgets import POSITION_NOTE, answer_block, ranked_columns

tracer = get_tracer()
st.title("Fine-tuning examples behind the answer")
st.caption("Single-stage influence of each fine-tuning record on the same answer: the record's "
           "gradient at the fine-tuned weights (response tokens, as it was trained), preconditioned "
           "by (H_ft + λI)⁻¹. Every record is scored exactly.")

trace: Trace | None = st.session_state.get("trace")
if trace is None:
    st.info("Trace a prompt first; this page then shows the fine-tuning records behind its answer.")
    st.page_link("views/trace.py", label="Trace an answer", icon=":material/search:")
    st.stop()

st.markdown("**Prompt**")
answer_block(trace.prompt)
st.markdown("**Answer**")
answer_block(trace.answer)
if trace.versus is not None:
    st.markdown("**…rather than**")
    answer_block(trace.versus)
if trace.span is not None:
    st.caption(f"Scored on answer tokens {trace.span[0]}:{trace.span[1]} alone, as the trace was.")

key = (trace.settings.model_prompt, trace.answer, len(trace.proponents), trace.versus, str(trace.span))
found = st.session_state.get("finetune")
if found is None or found[0] != key:
    with st.spinner(f"Scoring {len(tracer.study.records)} fine-tuning records…"):
        try:
            result = tracer.finetune_examples(trace.prompt, trace.answer, len(trace.proponents),
                                              trace.settings.context, versus=trace.versus, span=trace.span)
        except Exception as err:  # noqa: BLE001 - one line on the page
            show_error(err, "Could not score the fine-tuning records")
            st.stop()
    found = st.session_state["finetune"] = (key, result)
result: Trace = found[1]

st.caption(f"{result.settings.retrieval} · {result.timings.total:.2f} s · " + POSITION_NOTE)
ranked_columns(result.proponents, result.opponents, RECORDS_METHOD,
               st.session_state.get("shared_scale", False), result)
st.plotly_chart(charts.score_distribution(result.pool_scores, [h.score for h in result.proponents + result.opponents],
                                          "all fine-tuning records"), key="ft-distribution")

"""The study: models, corpus, fine-tuning data, curvature spectra and how it was built."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from explorer import charts, overview
from explorer.session import get_tracer

tracer = get_tracer()


@st.cache_data(show_spinner=False)
def _summary(study: str, _tracer) -> overview.StudySummary:
    return overview.summarize(_tracer.study)


@st.cache_data(show_spinner="Counting document tokens…")
def _lengths(study: str, _tracer):
    return overview.document_lengths(_tracer.study)


@st.cache_data(show_spinner=False)
def _largest(study: str, _tracer):
    return overview.largest_norms(_tracer.study)


@st.cache_data(show_spinner=False)
def _spectra(study: str, _tracer):
    return overview.spectra(_tracer.study)


key = f"{tracer.study.root}@{tracer.study.manifest.get('updated', '')}"  # a rebuilt study is re-read
summary = _summary(key, tracer)
st.title("Study")
st.caption(f"{summary.root} · running on {summary.device}")

cols = st.columns(4)
cols[0].metric("Pretraining documents", f"{summary.documents:,}")
cols[1].metric("Fine-tuning records", f"{summary.records:,}")
cols[2].metric("Indexed documents", f"{summary.indexed_documents:,}")
cols[3].metric("Candidates per sign", summary.candidates_per_sign)

st.subheader("Search index")
st.write(summary.search_text())

st.subheader("Models")
models = summary.model_table()
st.dataframe(pd.DataFrame(models).T.astype(str), width="stretch")

st.subheader("Corpus")
left, right = st.columns(2)
lengths = _lengths(key, tracer)
limit = tracer.study.config.influence.max_length
left.plotly_chart(charts.histogram(lengths, f"Document lengths ({len(lengths):,} documents)", "tokens"),
                  key="lengths")
left.caption(f"median {int(pd.Series(lengths).median())} tokens; {int((lengths > limit).sum())} "
             f"longer than max_length = {limit} are truncated when scored.")
categories = pd.Series(summary.record_categories, name="records")
right.plotly_chart(charts.bar(categories, "Fine-tuning records by category"), key="categories")

st.subheader("Documents with the largest norms")
norms = _largest(key, tracer)
st.dataframe(norms, hide_index=True, width="stretch",
             column_config={"gradient norm": st.column_config.NumberColumn(format="%.4g"),
                            "× median": st.column_config.NumberColumn(format="%.1f"),
                            "whitened norm": st.column_config.NumberColumn(format="%.4g"),
                            "whitened × median": st.column_config.NumberColumn(format="%.1f")})
st.caption("Raw influence is proportional to a document's gradient, so documents with large norms (garbled, "
           "repetitive or unusual text) can top any query's raw ranking. The normalised rankings divide by "
           "these norms; the Charts tab of a trace plots score against norm for the documents it scored.")

st.subheader("Curvature")
curves = _spectra(key, tracer)
layers = list(next(iter(curves.values())))
chosen = st.multiselect("Layers", layers, default=layers[:4], key="spectrum_layers")
if chosen:
    st.plotly_chart(charts.spectra(curves, chosen, tracer.study.config.influence.alpha), key="spectra")
st.caption("EK-FAC eigenvalues of each tracked layer's Fisher block, largest first. The inverse "
           "(H + λI)⁻¹ treats directions with eigenvalues far below the damping as flat (scaled by "
           "1/λ) and shrinks those far above it. Multi-stage damps the fine-tuned Fisher with the "
           "proximity strength α (dotted) and the pretrained one with λ (dashed); single-stage "
           "uses λ on the fine-tuned one.")
factor_rows = {stage: {k: v for k, v in info.items() if k.startswith("factor_")}
               for stage, info in models.items()}
st.dataframe(pd.DataFrame(factor_rows).T, width="stretch")

st.subheader("Build settings")
st.json(summary.influence, expanded=False)
stages = pd.DataFrame([{"stage": name, "finished": info.get("finished", ""),
                        "settings": json.dumps(info.get("config", {}))[:200]}
                       for name, info in summary.stages.items()])
st.dataframe(stages, hide_index=True, width="stretch")
with st.expander("Software versions"):
    st.json(summary.software)

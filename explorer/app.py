"""MSIF Explorer, the Streamlit app. Start it with `msif app [--study DIR]`, which runs
`streamlit run explorer/app.py` with MSIF_STUDY set; every page reads the study from there."""

import streamlit as st

from explorer.session import show_error

st.set_page_config(page_title="MSIF Explorer", page_icon=":material/search:", layout="wide")
page = st.navigation([
    st.Page("views/trace.py", title="Trace an answer", icon=":material/search:", url_path="trace", default=True),
    st.Page("views/finetune.py", title="Fine-tuning examples", icon=":material/school:", url_path="finetune"),
    st.Page("views/study.py", title="Study", icon=":material/database:", url_path="study"),
])
try:
    page.run()
except Exception as err:  # noqa: BLE001 - st.stop and reruns are BaseExceptions: they pass through
    show_error(err, "This page failed")

"""The Streamlit app over a study directory (see issue: the explorer)."""

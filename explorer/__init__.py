"""The explorer: ``msif`` (the command line), the query library (``Tracer``) and the Streamlit app
over a finished study directory."""

"""Streamlit glue shared by the pages: one Tracer per process, and the URL <-> form state.

The Tracer (models, factors, index) is created once per process with ``st.cache_resource`` and
shared by every browser session; it serialises model use with its own lock. Each session keeps
its own results in ``st.session_state``, so sessions cannot see or overwrite each other's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import streamlit as st

from engine.methods import ALL_METHODS
from engine.models import quiet_libraries
from engine.study import DEFAULT_STUDY, Study, StudyError

from .server import DEVICE_ENV, STUDY_ENV
from .tracer import Tracer

# URL query parameter -> session-state key of the widget it fills
URL_FIELDS = {"prompt": "instruction", "answer": "typed_answer", "method": "method"}


@st.cache_resource(max_entries=1, show_spinner="Opening the study: models, factors, index…")
def _open(study_dir: str, device: str, built: float) -> Tracer:
    """``built`` (the manifest's mtime) is part of the key: a rebuilt study is reopened."""
    quiet_libraries()
    return Tracer.open(study_dir, device)


def study_dir() -> Path:
    return Path(os.environ.get(STUDY_ENV, DEFAULT_STUDY)).resolve()


def get_tracer() -> Tracer:
    """The process-wide Tracer, or a clear message and a stopped page if the study is unusable."""
    path = study_dir()
    manifest = Study(path).manifest_path
    try:
        if not manifest.exists():
            raise StudyError(f"no study at {path} ({manifest.name} is missing)")
        tracer = _open(str(path), os.environ.get(DEVICE_ENV, "auto"), manifest.stat().st_mtime)
        Study(path).verify()  # at every run of a page: a file changed since opening is refused (a stat per file)
        return tracer
    except (StudyError, ValueError, OSError) as err:  # FactorMismatchError is a ValueError
        st.error(f"Cannot open the study: {without_paths(str(err), path)}")
        st.info(f"Build the demo study with `msif build-demo --out {DEFAULT_STUDY}`, or start the "
                "app on another study with `msif app --study DIR`.")
        st.stop()


def without_paths(message: str, study: Path) -> str:
    """A message for the page: the server's directories are not shown to whoever opens it (the
    terminal that started the app has the full message)."""
    import re

    print(f"msif app: {message}", file=sys.stderr, flush=True)
    message = message.replace(str(study), "the study directory")
    return re.sub(r"(?<![\w.])/[^\s:;,'\"`()]+", "<path>", message)


def restore_from_url() -> bool:
    """Fill the form from ?prompt=&answer=&method= once per session; True if a prompt came in."""
    if st.session_state.get("_url_restored"):
        return False
    st.session_state["_url_restored"] = True
    params = st.query_params
    unknown = sorted(set(params) - set(URL_FIELDS))
    if unknown:
        st.warning(f"Ignored URL parameter{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}: "
                   f"this page reads {', '.join(URL_FIELDS)}.")
    for param, key in URL_FIELDS.items():
        value = params.get(param)
        if value is None:
            continue
        if param == "method" and value not in ALL_METHODS:
            st.warning(f"Unknown method {value!r} in the URL: using {st.session_state.get(key, ALL_METHODS[0])}; "
                       f"the methods are {', '.join(ALL_METHODS)}.")
            continue
        st.session_state[key] = value
    return bool(params.get("prompt", "").strip())


def share_in_url(prompt: str, answer: str, method: str) -> None:
    st.query_params.from_dict({"prompt": prompt, "answer": answer, "method": method})

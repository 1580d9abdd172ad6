"""Streamlit glue shared by the pages: one Tracer per process, and the URL <-> form state.

The Tracer (models, factors, index) is created once per process with ``st.cache_resource`` and
shared by every browser session; it serialises model use with its own lock. Each session keeps
its own results in ``st.session_state``, so sessions cannot see or overwrite each other's.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import streamlit as st

from engine.console import error_line
from engine.methods import ALL_METHODS, DEFAULT_NORMALIZATION
from engine.models import quiet_libraries
from engine.normalization import Normalization
from engine.query import Target
from engine.study import DEFAULT_STUDY, Study, StudyError

from .server import DEVICE_ENV, FACTORS_ENV, STUDY_ENV
from .tracer import Tracer

# URL query parameter -> session-state key of the widget it fills
URL_FIELDS = {"prompt": "instruction", "answer": "typed_answer", "versus": "versus", "method": "method",
              "normalize": "normalize", "span": "span"}
# the rankings offered in the app: the default first, then raw influence and the other forms measured
RANKINGS = tuple(dict.fromkeys([DEFAULT_NORMALIZATION, "none", "gradient", "gradient^0.5", "gradient@median",
                                "whitened", "whitened^0.5", "whitened@median", "metric", "metric^0.5"]))


def ranking_label(spec: str) -> str:
    words = Normalization.parse(spec).describe()
    return f"{words} (default)" if spec == DEFAULT_NORMALIZATION else words


@st.cache_resource(max_entries=1, show_spinner="Opening the study: models, factors, index…")
def _open(study_dir: str, device: str, built: float, factor_precision: str = "") -> Tracer:
    """``built`` (the manifest's mtime) is part of the key: a rebuilt study is reopened."""
    quiet_libraries()
    return Tracer.open(study_dir, device, factor_precision=factor_precision or None)


def study_dir() -> Path:
    return Path(os.environ.get(STUDY_ENV, DEFAULT_STUDY)).resolve()


def get_tracer() -> Tracer:
    """The process-wide Tracer, or a clear message and a stopped page if the study is unusable."""
    path = study_dir()
    manifest = Study(path).manifest_path
    try:
        if not manifest.exists():
            raise StudyError(f"no study at {path} ({manifest.name} is missing)")
        tracer = _open(str(path), os.environ.get(DEVICE_ENV, "auto"), manifest.stat().st_mtime,
                       os.environ.get(FACTORS_ENV, ""))
        Study(path).verify()  # at every run of a page: a file changed since opening is refused (a stat per file)
        return tracer
    except Exception as err:  # noqa: BLE001 - whatever went wrong, a line on the page, not Streamlit's error
        show_error(err, "Cannot open the study")
        st.info(f"Build the demo study with `msif build-demo --out {DEFAULT_STUDY}`, or start the "
                "app on another study with `msif app --study DIR`.")
        st.stop()


def show_error(err: Exception, doing: str) -> None:
    """An error as one line on the page, never Streamlit's error page: a user's error (bad input, a
    damaged study) as the CLI would print it, without server paths; an unforeseen one as an internal
    error to report, its traceback in the server's log only."""
    line = error_line(err)
    if line is None:
        print(f"msif app: internal error while {doing.lower()}:", file=sys.stderr)
        traceback.print_exception(err, file=sys.stderr)
        st.error(f"{doing}: internal error ({type(err).__name__}); please report it.")
    else:
        st.error(f"{doing}: {without_paths(line, study_dir())}")


def without_paths(message: str, study: Path) -> str:
    """A message for the page: the server's directories are not shown to whoever opens it (the
    terminal that started the app has the full message)."""
    import re

    print(f"msif app: {message}", file=sys.stderr, flush=True)
    message = message.replace(str(study), "the study directory")
    return re.sub(r"(?<![\w.])/[^\s:;,'\"`()]+", "<path>", message)


def restore_from_url() -> bool:
    """Fill the form from ?prompt=&answer=&versus=&method=&normalize=&span= once per session; True if a
    prompt came in."""
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
        if param in URL_PARSERS:
            try:
                value = URL_PARSERS[param](value)
            except ValueError as err:
                st.warning(f"Ignored {param}={value!r} in the URL: {err}.")
                continue
        st.session_state[key] = value
    return bool(params.get("prompt", "").strip())


def _offered_ranking(value: str) -> str:
    spec = str(Normalization.parse(value))
    if spec not in RANKINGS:
        raise ValueError(f"it is not offered here; the choices are {', '.join(RANKINGS)}")
    return spec


# URL parameters checked (and written canonically) before they fill the form; a ValueError says why not
URL_PARSERS = {"span": lambda value: format_span(Target.parse_span(value)), "normalize": _offered_ranking}


def format_span(span: tuple[int, int] | list[int] | None) -> str:
    return "" if span is None else f"{span[0]}:{span[1]}"


def share_fields(trace) -> dict[str, str]:
    """The URL parameters that restore ``trace`` (its prompt, answer, contrast, method, ranking, span)."""
    fields = {"prompt": trace.prompt, "answer": trace.answer, "versus": trace.versus or "", "method": trace.method,
              "normalize": trace.settings.normalization, "span": format_span(trace.span)}
    return {k: v for k, v in fields.items() if v or k in ("prompt", "answer")}


def share_in_url(trace) -> None:
    st.query_params.from_dict(share_fields(trace))

"""Results as files: CSV (one row per ranked document) and JSON (everything, token scores too)."""

from __future__ import annotations

import json

import pandas as pd

from engine.methods import method as method_spec

from .heatmap import snippet
from .results import Trace

COLUMNS = ["method", "sign", "rank", "doc_id", "title", "score", "normalized_score", "norm", "ranked_by",
           "projected_score", "top_tokens", "snippet", "prompt", "answer", "versus", "span", "target"]


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet evaluates a cell starting so


def spreadsheet_safe(value):
    """A text cell a spreadsheet would read as a formula gets a leading apostrophe (OWASP's advice);
    numbers and other text are unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def hits_frame(trace: Trace, top_tokens: int = 5) -> pd.DataFrame:
    rows = []
    baseline = method_spec(trace.method).is_baseline
    for sign, hits in (("most similar" if baseline else "proponent", trace.proponents),
                       ("least similar" if baseline else "opponent", trace.opponents)):
        for rank, hit in enumerate(hits, start=1):
            order = sorted(range(len(hit.token_scores)), key=lambda i: -abs(hit.token_scores[i]))
            rows.append({"method": trace.method, "sign": sign, "rank": rank, "doc_id": hit.doc_id,
                         "title": hit.title, "score": hit.score, "normalized_score": hit.normalized_score,
                         "norm": hit.norm, "ranked_by": trace.settings.normalization,
                         "projected_score": hit.projected_score,
                         "top_tokens": " | ".join(f"{hit.tokens[i]!r}:{hit.token_scores[i]:+.3g}"
                                                  for i in order[:top_tokens]),
                         "snippet": snippet(hit.text, hit.tokens, hit.token_scores),
                         "prompt": trace.prompt, "answer": trace.answer, "versus": trace.versus,
                         "span": None if trace.span is None else f"{trace.span[0]}:{trace.span[1]}",
                         "target": trace.settings.target})
    return pd.DataFrame(rows, columns=COLUMNS)


def to_csv(trace: Trace) -> bytes:
    """The ranked documents as CSV, safe to open in a spreadsheet (no cell is evaluated)."""
    return hits_frame(trace).map(spreadsheet_safe).to_csv(index=False).encode("utf-8")


def to_json(trace: Trace) -> bytes:
    return json.dumps(trace.to_json(with_text=True), indent=1, ensure_ascii=False).encode("utf-8")

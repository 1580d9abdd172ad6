"""Results as files: CSV (one row per ranked document), JSON (everything, token scores too) and JSONL
for the TrackStar output viewer (one query per line)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pandas as pd

from engine.methods import method as method_spec

from .heatmap import format_score, snippet
from .results import DocumentHit, Hit, Trace

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
                         "top_tokens": " | ".join(f"{hit.tokens[i]!r}:{format_score(hit.token_scores[i])}"
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


def viewer_record(trace: Trace, example_id: str, query_set: str) -> dict:
    """One query in the TrackStar output viewer's format (PAIR-code/pretraining-tda, "TDA method results"):
    the prompt and answer as ``inputs_plaintext``/``targets_plaintext``, and per side the texts, ids
    (strings) and scores it lists. ``*_scores`` are what the ranking ordered by (the normalised score, or
    the exact one), ``*_influence`` the exact influence; a baseline, which has no opponents, gives none.
    The other fields are this tool's, which the viewer ignores."""
    def side(name: str, hits: Sequence[Hit]) -> dict:
        return {f"{name}s": [h.text for h in hits],
                f"{name}_ids": [str(h.doc_id if isinstance(h, DocumentHit) else h.record_id) for h in hits],
                f"{name}_scores": [h.score if h.normalized_score is None else h.normalized_score for h in hits],
                f"{name}_influence": [h.score for h in hits]}

    record = {"example_id": example_id, "query_set": query_set, "inputs_plaintext": trace.prompt,
              "targets_plaintext": trace.answer, **side("proponent", trace.proponents)}
    if not method_spec(trace.method).is_baseline:
        record.update(side("opponent", trace.opponents))
    record.update({"method": trace.method, "ranked_by": trace.settings.normalization, "target": trace.settings.target,
                   "versus": trace.versus, "span": trace.span, "model_prompt": trace.settings.model_prompt})
    return record


def to_viewer_jsonl(traces: Sequence[Trace], query_set: str = "msif") -> bytes:
    """Traces as JSONL the TrackStar output viewer loads (https://pair-code.github.io/pretraining-tda/demo):
    one query per line, strict JSON (no NaN, which the browser's JSON.parse refuses)."""
    return "".join(json.dumps(viewer_record(t, f"{query_set}-{n}", query_set), ensure_ascii=False, allow_nan=False)
                   + "\n" for n, t in enumerate(traces)).encode("utf-8")

"""What a trace returns: ranked hits with their token scores, the settings and the timings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from engine.methods import method as method_spec
from engine.query import Side


@dataclass
class DocumentHit:
    """A ranked pretraining document."""

    doc_id: int
    score: float  # exact influence (or baseline similarity), never a projected estimate
    title: str
    text: str
    tokens: list[str] = field(default_factory=list)  # document tokens as text pieces
    token_scores: list[float] = field(default_factory=list)  # per token, sums to score
    layer_scores: dict[str, float] = field(default_factory=dict)  # per tracked layer
    projected_score: float | None = None  # the index's estimate, when retrieval used one
    normalized_score: float | None = None  # score / d(z) when the ranking is normalised (what it is ranked by)
    norm: float | None = None  # n(z), the document's norm the normalised score divides by
    percentile: float | None = None  # share of the scored items ranked at or below it (100 = the top)
    scored: int | None = None  # how many items were scored (the candidate pool, or every one)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RecordHit:
    """A ranked fine-tuning record."""

    record_id: int
    score: float  # exact single-stage influence
    instruction: str
    category: str
    text: str  # the record as it was trained on: prompt + response
    tokens: list[str] = field(default_factory=list)
    token_scores: list[float] = field(default_factory=list)
    layer_scores: dict[str, float] = field(default_factory=dict)
    normalized_score: float | None = None  # score / d(z) when the ranking is normalised
    norm: float | None = None  # n(z)
    percentile: float | None = None  # share of the scored items ranked at or below it (100 = the top)
    scored: int | None = None  # how many items were scored (the candidate pool, or every one)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Hit = DocumentHit | RecordHit


def document_hits(side: Side, documents) -> list[DocumentHit]:
    """One side of a ranking as hits, with the documents' titles and texts."""
    return [DocumentHit(int(i), float(side.exact[j]), documents[int(i)]["title"], documents[int(i)]["text"],
                        projected_score=_at(side.projected, j), normalized_score=_at(side.normalized, j),
                        norm=_at(side.norms, j)) for j, i in enumerate(side.ids)]


def record_hits(side: Side, records, prompts) -> list[RecordHit]:
    """One side of a ranking of fine-tuning records as hits, each with its text as trained on
    (``prompts``: the study's prompt template)."""
    hits = []
    for j, i in enumerate(int(i) for i in side.ids):
        row = records[i]
        text = prompts.prompt(row["instruction"], row["context"]) + row["response"]
        hits.append(RecordHit(i, float(side.exact[j]), row["instruction"], row["category"], text,
                              normalized_score=_at(side.normalized, j), norm=_at(side.norms, j)))
    return hits


def _at(values, j: int) -> float | None:
    return None if values is None else float(values[j])


@dataclass
class TraceSettings:
    """How a trace was computed."""

    alpha: float  # fine-tuning proximity (multi-stage's (H_ft + alpha I))
    top_k: int
    damping: dict[str, float]  # lambda per layer; empty for baselines
    retrieval: str  # in words: index candidates re-scored exactly, or exact over everything
    model_prompt: str  # the exact text the model saw before the answer
    context: str
    normalization: str = "none"  # what the ranking divides exact scores by (engine.normalization spec)
    ranked_by: str = "raw influence"  # the same in words
    target: str = "log p(answer)"  # what the scores are influence on (engine.query.Target.describe)


@dataclass
class Timings:
    """Seconds per step of a trace."""

    generate: float | None = None  # None when the answer was given
    rank: float = 0.0
    heatmaps: float = 0.0
    total: float = 0.0

    def to_json(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Trace:
    prompt: str
    answer: str
    method: str
    proponents: list[Hit]  # up to top_k, score > 0 (raise the answer's log-likelihood)
    opponents: list[Hit]  # up to top_k, score < 0; baselines: least similar, unsigned
    answer_tokens: list[str]
    settings: TraceSettings
    timings: Timings
    pool_ids: list[int] = field(default_factory=list)  # every document scored (the candidate pool, or all)
    pool_scores: list[float] = field(default_factory=list)  # their exact scores
    pool_norms: list[float] = field(default_factory=list)  # their norms n(z) (gradient norms for a raw ranking)
    pool_ranked: list[float] = field(default_factory=list)  # what the ranking orders them by (= pool_scores when raw)
    versus: str | None = None  # a contrastive trace's other answer: scores are on log p(answer) - log p(versus)
    versus_tokens: list[str] | None = None  # its tokens as text pieces
    span: list[int] | None = None  # [start, end): the answer tokens the scores are on (None: all)

    def place(self, hit: Hit) -> tuple[int, str]:
        """Where ``hit`` stands among this trace's scored items, itself included whether or not it was
        one of them: sets its percentile (the share ranked at or below it by what the ranking orders
        by; 100 = the top) and returns (its rank on its side, the side: "proponent", "opponent",
        "similar" for a baseline, "none" for a score of 0)."""
        value = hit.score if hit.normalized_score is None else hit.normalized_score
        own = hit.doc_id if isinstance(hit, DocumentHit) else hit.record_id
        others = np.asarray(self.pool_ranked, np.float64)[np.asarray(self.pool_ids) != own]
        hit.percentile = 100.0 * (int((others <= value).sum()) + 1) / (len(others) + 1)
        hit.scored = len(others) + 1
        if method_spec(self.method).is_baseline:
            return 1 + int((others > value).sum()), "similar"
        if value == 0:
            return 0, "none"
        return (1 + int((others > value).sum()), "proponent") if value > 0 else (1 + int((others < value).sum()),
                                                                                  "opponent")

    def to_json(self, with_text: bool = False) -> dict[str, Any]:
        def hit(h: Hit) -> dict[str, Any]:
            data = h.to_json()
            if not with_text:
                data.pop("text")
            return data
        return {"prompt": self.prompt, "answer": self.answer, "method": self.method,
                "scores": ("similarity (a baseline; unsigned: 'opponents' are the least similar)"
                           if method_spec(self.method).is_baseline
                           else "influence: positive raises the answer's log-likelihood" if self.versus is None
                           else "influence on log p(answer) - log p(versus): positive makes the answer more likely "
                                "relative to versus"),
                "proponents": [hit(h) for h in self.proponents],
                "opponents": [hit(h) for h in self.opponents],
                "answer_tokens": self.answer_tokens, "versus": self.versus, "versus_tokens": self.versus_tokens,
                "span": self.span, "settings": asdict(self.settings),
                "timings": self.timings.to_json(), "pool_scores": self.pool_scores}


@dataclass
class DocumentLookup:
    """Any document asked for by id, scored for a trace's answer, and where it stands among the trace's
    scored documents (itself included)."""

    hit: DocumentHit  # its exact score (and normalised one), heatmap and percentile
    rank: int  # 1 = first on its side (proponents for a positive score, opponents for a negative one)
    side: str  # "proponent", "opponent" (or a baseline's "similar"), "none" for a score of 0
    in_pool: bool  # whether the trace scored it (an index candidate, or every document exhaustively)

    def where(self) -> str:
        """Its place in words: "#3 among the proponents", "#1 by similarity", "no influence either way"."""
        if self.side == "none":
            return "no influence either way"
        return f"#{self.rank} by similarity" if self.side == "similar" else f"#{self.rank} among the {self.side}s"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["hit"].pop("text")
        return data


@dataclass
class AnswerTokenMap:
    """Answer-token x document-token influence of one document: rows sum to each answer token's
    score, columns to each document token's, everything to the document's score."""

    answer_tokens: list[str]
    document_tokens: list[str]
    matrix: np.ndarray  # (answer tokens [+ versus tokens], document tokens) float64
    versus_tokens: list[str] = field(default_factory=list)  # a contrastive trace's other answer: rows after
    # the answer's, negated (each is minus the document's influence on that token's log-probability)

    @property
    def row_tokens(self) -> list[str]:
        """A label per row of ``matrix``: the answer's tokens, then the contrasted answer's marked "vs"."""
        return self.answer_tokens + [f"vs {t}" for t in self.versus_tokens]

"""Answer a prompt and trace the answer to pretraining documents: the library behind the CLI and app.

A :class:`Tracer` opens a study once (models, factors, projector, index, corpus) and then serves
queries. It speaks in documents, scores and tokens; the curvature lives in the engine.
Scores follow the project's sign convention: positive = the document raises the answer's
log-likelihood (proponent), negative = lowers it (opponent).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import datasets
import numpy as np
import torch

from engine import (BM25, METHODS, Factors, damping_values, GradientIndex, KroneckerProjector, LanguageModelingTask,
                    ScoreArguments, attribute_tokens, encode_document_batches, encode_prompt_answer,
                    precondition, pooled_representations, cosine_similarity, rescore, retrieve,
                    score_documents, sequence_gradients)
from precompute import pipeline as P
from precompute.config import StudyConfig, format_prompt
from precompute.study import Study

TASK = LanguageModelingTask()
ALL_METHODS = METHODS + ("representation", "bm25")
INDEXED = ("multi-stage", "pt-inverse-dropped", "gradient-dot", "gradient-cosine")
REQUIRED_STAGES = ["corpus", "finetune-data", "factors-pretrained", "factors-finetuned",
                   "projection", "index"]
MAX_PROMPT_CHARS = 8000


@dataclass
class DocumentHit:
    doc_id: int
    score: float  # exact influence (or baseline similarity), never a projected estimate
    title: str
    text: str
    tokens: list[str] = field(default_factory=list)  # document tokens as text pieces
    token_scores: list[float] = field(default_factory=list)  # per token, sums to score
    layer_scores: dict[str, float] = field(default_factory=dict)  # per tracked layer
    projected_score: float | None = None  # the index's estimate, when retrieval used one

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Trace:
    prompt: str
    answer: str
    method: str
    proponents: list[DocumentHit]  # up to top_k, score > 0 (raise the answer's log-likelihood)
    opponents: list[DocumentHit]  # up to top_k, score < 0; baselines: least similar, unsigned
    answer_tokens: list[str]
    settings: dict[str, Any]
    timings: dict[str, float]
    pool_scores: list[float] = field(default_factory=list)  # exact scores of every document scored

    def to_json(self, with_text: bool = False) -> dict[str, Any]:
        def hit(h: DocumentHit) -> dict[str, Any]:
            data = h.to_json()
            if not with_text:
                data.pop("text")
            return data
        return {"prompt": self.prompt, "answer": self.answer, "method": self.method,
                "proponents": [hit(h) for h in self.proponents],
                "opponents": [hit(h) for h in self.opponents],
                "answer_tokens": self.answer_tokens, "settings": self.settings,
                "timings": self.timings, "pool_scores": self.pool_scores}


def check_prompt(text: str) -> str:
    text = text.strip()
    if not text:
        raise ValueError("the prompt is empty: type a question or instruction")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    return text


class Tracer:
    """Everything a query needs, loaded once. Thread-safe: queries run one at a time."""

    def __init__(self, study_dir: str | Path, device: str = "auto", progress: bool = False):
        self.study = Study(study_dir)
        manifest = self.study.verify(REQUIRED_STAGES)
        self.manifest = manifest
        self.config = StudyConfig.from_dict(manifest["config"])
        self.device = P.resolve_device(device if device != "auto" else self.config.models.device)
        self.progress = progress
        self._lock = threading.Lock()
        m = self.config.models
        self.tokenizer = P.load_tokenizer(P.model_path(self.study, m.tokenizer or m.finetuned))
        self.pt_model = P.load_model(P.model_path(self.study, m.base), m.dtype, self.device)
        self.ft_model = P.load_model(P.model_path(self.study, m.finetuned), m.dtype, self.device)
        self.pt_layers = P.tracked_layers(self.pt_model, self.config)
        self.ft_layers = P.tracked_layers(self.ft_model, self.config)
        self.pt_factors = Factors.load(self.study.path(P.PT_FACTORS))
        self.ft_factors = Factors.load(self.study.path(P.FT_FACTORS))
        self.pt_factors.check_compatible(self.pt_model, self.pt_layers)
        self.ft_factors.check_compatible(self.ft_model, self.ft_layers)
        self.projector = KroneckerProjector.load(self.study.path(P.PROJECTOR))
        self.projector.check_compatible(self.pt_layers)
        self.index = GradientIndex.load(self.study.path(P.INDEX))
        self.cosine_index = GradientIndex.load(self.study.path(P.COSINE_INDEX))
        self.whitened_index = GradientIndex.load(self.study.path(P.WHITENED_INDEX))
        self.whitening = P.whitening_for(self.pt_factors, self.config)
        self.documents = datasets.Dataset.from_parquet(str(self.study.path(P.DOCUMENTS)))
        self.records = datasets.Dataset.from_parquet(str(self.study.path(P.RECORDS)))
        self._bm25: BM25 | None = None
        self._representations: np.ndarray | None = None

    # -- answering ------------------------------------------------------------------------------
    def prompt_for(self, instruction: str, context: str = "") -> str:
        return format_prompt(self.config, check_prompt(instruction), context)

    @torch.no_grad()
    def generate(self, instruction: str, context: str = "", max_new_tokens: int = 48,
                 temperature: float = 0.0) -> str:
        prompt = self.prompt_for(instruction, context)
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        limit = self.config.influence.max_length - max_new_tokens
        if limit < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt")
        ids = ids[:, -limit:].to(self.device)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {
            "do_sample": False}
        with self._lock:
            out = self.ft_model.generate(ids, attention_mask=torch.ones_like(ids),
                                         max_new_tokens=max_new_tokens,
                                         pad_token_id=self.tokenizer.pad_token_id,
                                         eos_token_id=self.tokenizer.eos_token_id, **sampling)
        answer = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return answer.split("### End")[0].strip()

    # -- tracing --------------------------------------------------------------------------------
    def score_arguments(self, method: str) -> ScoreArguments:
        inf = self.config.influence
        return ScoreArguments(method=method, alpha=inf.alpha, damping=inf.damping,
                              damping_factor=inf.damping_factor)

    def query_vectors(self, prompt: str, answer: str, method: str, per_token: bool = False):
        """Preconditioned query u for the answer (or one per answer token with ``per_token``)."""
        batch = encode_prompt_answer(self.tokenizer, [prompt], [answer], self.config.influence.max_length)
        if per_token:
            batch, _ = TASK.split_targets(batch)
        grads = sequence_gradients(self.ft_model, TASK, batch, self.ft_layers)
        return precondition(grads, self.score_arguments(method), self.pt_factors, self.ft_factors)

    def trace(self, instruction: str, answer: str | None = None, method: str = "multi-stage",
              top_k: int = 10, context: str = "", heatmaps: bool = True,
              exhaustive: bool = False, on_stage: Callable[[str], None] | None = None,
              max_new_tokens: int = 48, temperature: float = 0.0) -> Trace:
        """Answer (unless ``answer`` is given) and rank documents by ``method``.

        Indexed methods retrieve candidates from projected gradients and re-score them exactly;
        the candidate set can miss true top documents (see benchmarks/retrieval.py).
        ``exhaustive=True`` scores every document exactly instead (slower, the reference).
        ``on_stage`` is told, in words, what starts next (for a progress display).
        """
        stage = on_stage or (lambda _: None)
        if method not in ALL_METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        timings: dict[str, float] = {}
        started = time.perf_counter()
        if answer is None or not answer.strip():
            stage("The fine-tuned model is answering")
            answer = self.generate(instruction, context, max_new_tokens, temperature)
            timings["generate"] = time.perf_counter() - started
        if not answer.strip():
            raise ValueError("the model's answer is empty; type an answer to trace")
        prompt = self.prompt_for(instruction, context)
        top_k = min(top_k, len(self.documents))
        with self._lock:
            t0 = time.perf_counter()
            stage(f"Ranking documents by {method}")
            pro, opp, query, pool_scores = self._rank(prompt, answer, method, top_k, exhaustive)
            if query is not None:
                pro, opp = _signed(pro, opp)
            timings["rank"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if heatmaps and query is not None:
                stage("Token heatmaps of the top documents")
                self._attach_heatmaps(pro + opp, query, *self._document_side(method), self._batches)
            timings["heatmaps"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - started
        settings = {"alpha": self.config.influence.alpha, "top_k": top_k,
                    "damping": query.damping if query is not None else {},
                    "retrieval": (f"index candidates ({self.config.influence.candidates} per sign) "
                                  "re-scored exactly" if method in INDEXED and not exhaustive
                                  else "exact, all documents")}
        settings["model_prompt"] = prompt
        settings["context"] = context
        return Trace(instruction.strip(), answer, method, pro, opp,
                     self._answer_pieces(prompt, answer), settings, timings, pool_scores)

    def _rank(self, prompt, answer, method, k, exhaustive=False):
        """(proponents, opponents, query or None, exact scores of every document scored)."""
        if method in ("representation", "bm25"):
            scores = self._baseline_scores(prompt, answer, method)
            return (*self._ranked(scores, k), None, scores.tolist())
        query = self.query_vectors(prompt, answer, method)
        if method in INDEXED and not exhaustive:
            pool = self.retrieve(query, max(k, self.config.influence.candidates))
            found = pool.head(k)
            pro = self._hits(found.proponent_ids[0], None, found.proponent_exact[0], found.proponent_projected[0])
            opp = self._hits(found.opponent_ids[0], None, found.opponent_exact[0], found.opponent_projected[0])
            scored = dict(zip(pool.proponent_ids[0].tolist(), pool.proponent_exact[0].tolist()))
            scored.update(zip(pool.opponent_ids[0].tolist(), pool.opponent_exact[0].tolist()))
            return pro, opp, query, list(scored.values())
        model, layers = self._document_side(method)
        scores = score_documents(model, TASK, self._batches(range(len(self.documents))), layers,
                                 query, progress=self.progress)[0].double().numpy()
        return (*self._ranked(scores, k), query, scores.tolist())

    def _ranked(self, scores: np.ndarray, k: int, hits=None):
        """The k highest and the k lowest scores as hits (``hits(ids, scores)``, documents by default)."""
        hits = hits or self._hits
        return hits(np.argsort(-scores)[:k], scores), hits(np.argsort(scores)[:k], scores)

    def retrieve(self, query, pool: int, whiten: bool = True):
        """Index candidates (``pool`` per sign) for a preconditioned query, re-scored exactly."""
        if query.method == "multi-stage" and whiten:  # split (H_pt + lambda)^-1 between sides
            found = retrieve(self.whitening.query_vectors(query.vectors), self.whitened_index, pool)
        else:
            index = self.cosine_index if query.method == "gradient-cosine" else self.index
            found = retrieve(self.projector.project_gradients(query.vectors), index, pool)
        return rescore(found, self.pt_model, TASK, self.pt_layers, query, self._batches)

    def _baseline_scores(self, prompt: str, answer: str, method: str) -> np.ndarray:
        if method == "bm25":
            if self._bm25 is None:
                self._bm25 = BM25(self.documents["text"])
            return self._bm25.score_prompt_answer([prompt], [answer])[0]
        if self._representations is None:
            self._representations = pooled_representations(
                self.ft_model, self._batches(range(len(self.documents))), progress=self.progress)
        batch = encode_prompt_answer(self.tokenizer, [prompt], [answer], self.config.influence.max_length)
        q = pooled_representations(self.ft_model, [batch], progress=False)
        return cosine_similarity(q, self._representations)[0]

    def _batches(self, doc_ids: Sequence[int]):
        """Documents in order, batched by a token budget (batch_size x max_length tokens)."""
        texts = self.documents.select(list(doc_ids))["text"] if len(doc_ids) else []
        inf = self.config.influence
        return list(encode_document_batches(self.tokenizer, texts, inf.max_length,
                                            inf.batch_size * inf.max_length))

    def _hits(self, ids, scores=None, exact=None, projected=None) -> list[DocumentHit]:
        hits = []
        for j, doc_id in enumerate(int(i) for i in ids):
            row = self.documents[doc_id]
            score = float(exact[j]) if exact is not None else float(scores[doc_id])
            hits.append(DocumentHit(doc_id, score, row["title"], row["text"],
                                    projected_score=None if projected is None else float(projected[j])))
        return hits

    def _attach_heatmaps(self, hits: list[DocumentHit], query, model, layers, batches_for) -> None:
        if not hits:
            return
        start = 0
        for batch in batches_for([h.doc_id for h in hits]):
            batch_hits, start = hits[start:start + len(batch["input_ids"])], start + len(batch["input_ids"])
            att = attribute_tokens(model, TASK, batch, layers, query)
            for b, hit in enumerate(batch_hits):
                n = int(batch["attention_mask"][b].sum())
                hit.tokens = self._pieces(batch["input_ids"][b, :n])
                hit.token_scores = att.token_scores[0, b, :n].double().tolist()
                hit.layer_scores = dict(zip(att.layer_names, att.layer_scores[0, b].double().tolist()))

    def finetune_examples(self, instruction: str, answer: str, top_k: int = 10, context: str = "",
                          heatmaps: bool = True) -> Trace:
        """The fine-tuning records most influential on ``answer`` (single-stage influence).

        Records are the fine-tuned model's own training data, so their gradients are taken at
        theta_ft on the response tokens, exactly as they were trained, and preconditioned with
        (H_ft + lambda I)^-1. Every record is scored exactly (there is no index of records).
        """
        if not answer.strip():
            raise ValueError("there is no answer to trace; trace a prompt first or type an answer")
        prompt = self.prompt_for(instruction, context)
        started = time.perf_counter()
        with self._lock:
            query = self.query_vectors(prompt, answer, "single-stage")
            scores = score_documents(self.ft_model, TASK, self._record_batches(range(len(self.records))),
                                     self.ft_layers, query, progress=self.progress)[0].double().numpy()
            k = min(top_k, len(self.records))
            pro, opp = _signed(*self._ranked(scores, k, self._record_hits))
            if heatmaps:
                self._attach_heatmaps(pro + opp, query, self.ft_model, self.ft_layers, self._record_batches)
        timings = {"total": time.perf_counter() - started}
        settings = {"alpha": self.config.influence.alpha, "top_k": k, "damping": query.damping,
                    "retrieval": f"exact, all {len(self.records)} fine-tuning records",
                    "model_prompt": prompt, "context": context}
        return Trace(instruction.strip(), answer, "single-stage", pro, opp,
                     self._answer_pieces(prompt, answer), settings, timings, scores.tolist())

    def _record_batches(self, record_ids: Sequence[int]):
        rows = self.records.select(list(record_ids))
        return list(P.record_batches(self.tokenizer, self.config, rows, self.config.influence.batch_size))

    def _record_hits(self, ids, scores: np.ndarray) -> list[DocumentHit]:
        hits = []
        for record_id in (int(i) for i in ids):
            row = self.records[record_id]
            text = format_prompt(self.config, row["instruction"], row["context"]) + row["response"]
            hits.append(DocumentHit(record_id, float(scores[record_id]), row["instruction"], text))
        return hits

    # -- the study ------------------------------------------------------------------------------
    def spectra(self, points: int = 256) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Eigenvalues of both approximate Fishers, per stage and layer: (ranks, values, lambda),
        largest first, with the damping lambda that layer uses."""
        out = {}
        for stage, factors in (("pretrained", self.pt_factors), ("fine-tuned", self.ft_factors)):
            damping = damping_values(factors, self.score_arguments("multi-stage"))
            out[stage] = {name: (*factors.spectrum(name, points), damping[name])
                          for name in factors.layers}
        return out

    def summary(self) -> dict[str, Any]:
        """What the study holds: models, corpus and fine-tuning data, factors, build settings."""
        def model_info(model, factors, layers):
            return {"class": type(model).__name__,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "tracked_layers": len(layers),
                    "tracked_parameters": sum(l.out_features * (l.in_features + l.has_bias) for l in layers),
                    "weights_sha256": factors.model["weights_sha256"][:16],
                    "factor_strategy": factors.strategy,
                    "factor_sequences": factors.num_sequences, "factor_tokens": factors.num_tokens}
        m = self.config.models
        return {
            "study": str(self.study.root),
            "device": str(self.device),
            "models": {"pretrained": {"path": m.base, **model_info(self.pt_model, self.pt_factors, self.pt_layers)},
                       "fine-tuned": {"path": m.finetuned, **model_info(self.ft_model, self.ft_factors, self.ft_layers)}},
            "documents": len(self.documents), "finetune_records": len(self.records),
            "record_categories": _counts(self.records["category"]),
            "index": {"documents": self.whitened_index.ntotal, "kind": self.whitened_index.kind,
                      "candidates_per_sign": self.config.influence.candidates},
            "influence": asdict(self.config.influence),
            "stages": self.manifest.get("stages", {}),
            "software": self.manifest.get("software", {}),
        }

    def document_lengths(self, limit: int = 5000) -> np.ndarray:
        """Token counts of (up to ``limit``, evenly spaced) documents, before truncation."""
        step = max(1, len(self.documents) // limit)
        texts = list(self.documents.select(range(0, len(self.documents), step))["text"])
        return np.array([len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]])

    def answer_token_map(self, prompt: str, answer: str, method: str, doc_id: int) -> dict[str, Any]:
        """Answer-token x document-token influence for one document (rows sum to the answer tokens'
        scores, everything sums to the document's score)."""
        with self._lock:
            query = self.query_vectors(prompt, answer, method, per_token=True)
            model, layers = self._document_side(method)
            batch = self._batches([doc_id])[0]
            att = attribute_tokens(model, TASK, batch, layers, query)
        return {"answer_tokens": self._answer_pieces(prompt, answer),
                "document_tokens": self._pieces(batch["input_ids"][0]),
                "matrix": att.token_scores[:, 0, :].double().numpy()}

    def _answer_pieces(self, prompt: str, answer: str) -> list[str]:
        """The answer's tokens as scored (after the prompt), as text pieces."""
        batch = encode_prompt_answer(self.tokenizer, [prompt], [answer], self.config.influence.max_length)
        return self._pieces(batch["input_ids"][0][batch["labels"][0] != -100])

    def _document_side(self, method: str):
        """Model and layers where documents' gradients live: theta_ft for single-stage (documents
        treated as training data of the fine-tuned model), theta_pt otherwise."""
        if method == "single-stage":
            return self.ft_model, self.ft_layers
        return self.pt_model, self.pt_layers

    def _pieces(self, ids) -> list[str]:
        return [self.tokenizer.decode([int(i)]) for i in ids]


def _signed(pro: list[DocumentHit], opp: list[DocumentHit]):
    """Influence has a sign: a proponent raises the answer's log-likelihood, an opponent lowers it."""
    return [h for h in pro if h.score > 0], [h for h in opp if h.score < 0]


def _counts(values: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v or "(none)"] = out.get(v or "(none)", 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))




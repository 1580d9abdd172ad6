"""Answer a prompt and trace the answer to pretraining documents: the library behind the CLI and app.

A :class:`Tracer` serves queries over one opened study (``engine.study.open_study``). It speaks
in documents, scores and tokens; the curvature lives in the engine. Scores follow the project's
sign convention: positive = the document raises the answer's log-likelihood (proponent),
negative = lowers it (opponent).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from engine import (
    BM25,
    LanguageModelingTask,
    PreconditionedQuery,
    Retrieval,
    attribute_tokens,
    cosine_similarity,
    document_metric,
    encode_prompt_answer,
    measure_documents,
    pooled_representations,
    precondition,
    rescore,
    sequence_gradients,
)
from engine.methods import BASELINES, check_method
from engine.normalization import DEFAULT, Normalization, NormalizedRanking
from engine.study import OpenedStudy, StageModel, open_study

from .results import AnswerTokenMap, DocumentHit, Hit, RecordHit, Timings, Trace, TraceSettings

TASK = LanguageModelingTask()
INDEXED = ("multi-stage", "pt-inverse-dropped", "gradient-dot", "gradient-cosine")  # served by an index
MAX_PROMPT_CHARS = 8000


def check_prompt(text: str) -> str:
    text = text.strip()
    if not text:
        raise ValueError("the prompt is empty: type a question or instruction")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    return text


class Tracer:
    """Answers and traces queries over one opened study. Thread-safe: queries run one at a time."""

    def __init__(self, study: OpenedStudy, progress: bool = False):
        self.study = study
        self.progress = progress
        self._lock = threading.Lock()
        self._bm25: BM25 | None = None
        self._representations: np.ndarray | None = None

    @classmethod
    def open(cls, root: str | os.PathLike, device: str = "auto", progress: bool = False) -> Tracer:
        return cls(open_study(root, device, progress=progress), progress)

    # -- answering ------------------------------------------------------------------------------
    def prompt_for(self, instruction: str, context: str = "") -> str:
        return self.study.prompts.prompt(check_prompt(instruction), context)

    @torch.no_grad()
    def generate(self, instruction: str, context: str = "", max_new_tokens: int = 48,
                 temperature: float = 0.0) -> str:
        tokenizer = self.study.tokenizer
        prompt = self.prompt_for(instruction, context)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        self._check_fits(ids.shape[1], max_new_tokens, "a generated answer of up to")
        ids = ids.to(self.study.device)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {
            "do_sample": False}
        with self._lock:
            out = self.study.finetuned.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return answer.split("### End")[0].strip()

    def check_request(self, instruction: str, answer: str | None = None, context: str = "",
                      max_new_tokens: int = 48) -> None:
        """Raise ValueError, saying why, unless the request can be traced as it is (nothing is cut)."""
        prompt = self.prompt_for(instruction, context)
        if answer is not None and answer.strip():
            self._check_answer_fits(prompt, answer)
        else:
            self._check_fits(len(self._tokens(prompt)), max_new_tokens, "a generated answer of up to")

    def _tokens(self, text: str) -> list[int]:
        return self.study.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _check_answer_fits(self, prompt: str, answer: str) -> None:
        self._check_fits(len(self._tokens(prompt)), len(self._tokens(answer)), "the answer's")

    def _check_fits(self, prompt_tokens: int, answer_tokens: int, what: str) -> None:
        """The model sees the whole prompt or nothing: a prompt that does not fit is refused, never cut."""
        limit = self.study.config.influence.max_length
        if prompt_tokens + answer_tokens > limit:
            raise ValueError(f"the prompt does not fit the study's context of {limit} tokens (influence.max_length): "
                             f"it is {prompt_tokens} tokens with the template, plus {what} {answer_tokens}; "
                             f"shorten it by at least {prompt_tokens + answer_tokens - limit} tokens")

    # -- tracing --------------------------------------------------------------------------------
    def preconditioned_query(self, prompt: str, answer: str, method: str,
                             per_token: bool = False) -> PreconditionedQuery:
        """Preconditioned query u for the answer (or one per answer token with ``per_token``)."""
        batch = self._answer_batch(prompt, answer)
        if per_token:
            batch, _ = TASK.split_targets(batch)
        ft = self.study.finetuned
        grads = sequence_gradients(ft.model, TASK, batch, ft.layers)
        return precondition(grads, self.study.config.influence.score_arguments(method),
                            self.study.pretrained.factors, ft.factors)

    def normalization_for(self, method: str, spec: str | Normalization | None = None) -> Normalization:
        """The normalisation a trace ranks by: ``spec``, or the default for influence methods; raw for
        the baselines (similarities) and gradient-cosine (already normalised)."""
        if method in BASELINES or method == "gradient-cosine":
            if spec is not None and not Normalization.parse(spec).is_raw:
                raise ValueError(f"{method} ranks by {'similarity' if method in BASELINES else 'cosine'} already; "
                                 "it takes no normalisation (use none)")
            return Normalization()
        norm = Normalization.parse(DEFAULT if spec is None else spec)
        if norm.norm == "whitened" and self._document_side(method) is not self.study.pretrained:
            raise ValueError(f"whitened norms are stored for documents at theta_pt; {method} scores them at "
                             "theta_ft: use gradient or metric")
        return norm

    def ranking(self, method: str, norm: Normalization, exhaustive: bool) -> NormalizedRanking | None:
        """Where a normalised ranking's norms come from: the scoring pass (gradient, metric) or the
        index (whitened); the floor and the zero guard from every document's stored norm, where stored."""
        if norm.is_raw:
            return None
        index, pretrained = self.study.index, self._document_side(method) is self.study.pretrained
        metric = document_metric(self.study.config.influence.score_arguments(method),
                                 self.study.pretrained.factors, self.study.finetuned.factors)
        if norm.norm == "whitened":
            return NormalizedRanking(norm, lambda ids, _: index.whitened_norms[ids], index.whitened_norms)
        if norm.norm == "metric" and metric is not None:
            if norm.floor is not None and not exhaustive:
                raise ValueError("a floor under the metric norm needs every document's metric norm: score "
                                 "exhaustively, or use whitened@median (the index's estimate of that norm)")
            return NormalizedRanking(norm, lambda ids, m: m.metric_sq_norms.numpy() ** 0.5, None, metric)
        return NormalizedRanking(norm, lambda ids, m: m.sq_norms.numpy() ** 0.5,  # gradient (metric = identity)
                                 index.norms.astype(np.float64) if pretrained else None)

    def _search_weights(self, method: str, norm: Normalization, vectors: str) -> np.ndarray | None:
        """Per-document weights of the index's scores: projected rows are unit-scale (times the
        exact norm for raw gradients); a normalised ranking divides by the index's estimate of d(z)."""
        index = self.study.index
        raw = index.norms if vectors == "projected" and method != "gradient-cosine" else None
        if norm.is_raw:
            return raw
        whitened = norm.norm == "whitened" or (norm.norm == "metric" and method == "multi-stage")
        estimate = (index.whitened_norms if whitened else index.norms).astype(np.float64)
        weights = 1.0 / norm.divisors(estimate, estimate)
        return (weights if raw is None else raw * weights).astype(np.float32)

    def trace(self, instruction: str, answer: str | None = None, method: str = "multi-stage",
              top_k: int = 10, context: str = "", heatmaps: bool = True,
              exhaustive: bool = False, on_stage: Callable[[str], None] | None = None,
              max_new_tokens: int = 48, temperature: float = 0.0,
              normalization: str | Normalization | None = None) -> Trace:
        """Answer (unless ``answer`` is given) and rank documents by ``method``.

        Indexed methods retrieve candidates from projected gradients and re-score them exactly;
        the candidate set can miss true top documents (see benchmarks/retrieval.py).
        ``exhaustive=True`` scores every document exactly instead (slower, the reference).
        ``normalization`` (``engine.normalization``; default ``engine.normalization.DEFAULT``) ranks
        by score / d(z); every hit keeps its exact score beside the normalised one.
        ``on_stage`` is told, in words, what starts next (for a progress display).
        """
        stage = on_stage or (lambda _: None)
        check_method(method)
        norm = self.normalization_for(method, normalization)
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        timings = Timings()
        started = time.perf_counter()
        if answer is None or not answer.strip():
            stage("The fine-tuned model is answering")
            answer = self.generate(instruction, context, max_new_tokens, temperature)
            timings.generate = time.perf_counter() - started
        if not answer.strip():
            raise ValueError("the model's answer is empty; type an answer to trace")
        prompt = self.prompt_for(instruction, context)
        self._check_answer_fits(prompt, answer)
        top_k = min(top_k, len(self.study.documents))
        with self._lock:
            t0 = time.perf_counter()
            stage(f"Ranking documents by {method}")
            pro, opp, query, pool = self._rank(prompt, answer, method, top_k, exhaustive, norm)
            timings.rank = time.perf_counter() - t0
            t0 = time.perf_counter()
            if heatmaps and query is not None:
                stage("Token heatmaps of the top documents")
                side = self._document_side(method)
                self._attach_heatmaps(pro + opp, [h.doc_id for h in pro + opp], query, side,
                                      self.study.document_batches)
            timings.heatmaps = time.perf_counter() - t0
        timings.total = time.perf_counter() - started
        indexed = method in INDEXED and not exhaustive
        retrieval = self._index_retrieval() if indexed else "exact, all documents"
        settings = TraceSettings(self.study.config.influence.alpha, top_k,
                                 query.damping if query is not None else {}, retrieval, prompt, context,
                                 str(norm), norm.describe())
        return Trace(instruction.strip(), answer, method, pro, opp, self.answer_pieces(prompt, answer),
                     settings, timings, *pool)

    def _rank(self, prompt: str, answer: str, method: str, k: int, exhaustive: bool, norm: Normalization):
        """(proponents, opponents, query or None, (pool ids, exact scores, norms) of every document scored)."""
        if method in BASELINES:
            scores = self.baseline_scores(prompt, answer, method)
            every = np.arange(len(scores))
            return (*self._ranked(scores, scores, None, k, self._document_hits), None,
                    (every.tolist(), scores.tolist(), []))
        query = self.preconditioned_query(prompt, answer, method)
        ranking = self.ranking(method, norm, exhaustive)
        if method in INDEXED and not exhaustive:
            pool = self.retrieve(query, max(k, self.study.config.influence.candidates), norm)
            pro, opp, scored = self._pool_hits(pool, k)
            return pro, opp, query, scored
        pro, opp, pool = self._score_all(query, self._document_side(method), self.study.document_batches,
                                         len(self.study.documents), ranking, k, self._document_hits)
        return pro, opp, query, pool

    def _score_all(self, query: PreconditionedQuery, side: StageModel, batches_for, count: int,
                   ranking: NormalizedRanking | None, k: int, hits: Callable[..., list]):
        """Every item (documents or records) scored exactly in one pass and ranked, raw or normalised:
        (proponents, opponents, (ids, exact scores, norms))."""
        every = np.arange(count)
        measured = measure_documents(side.model, TASK, batches_for(every), side.layers, query,
                                     progress=self.progress, metric=ranking.metric if ranking else None)
        exact = measured.scores[0].numpy()
        if query.normalize_documents:
            exact = exact / np.sqrt(measured.sq_norms.numpy()).clip(min=1e-30)
        ranked, norms = ranking.scored(every, measured, exact) if ranking else (exact, None)
        shown = np.sqrt(measured.sq_norms.numpy()) if norms is None else norms
        pro, opp = _signed(*self._ranked(ranked, exact, norms, k, hits))
        return pro, opp, (every.tolist(), exact.tolist(), shown.tolist())

    def _index_retrieval(self, shared_by: int = 1) -> str:
        """How an indexed trace's documents were found, in words (its settings' ``retrieval``)."""
        text = f"index candidates ({self.study.config.influence.candidates} per sign) re-scored exactly"
        return text + (f", in one pass shared by {shared_by} prompts" if shared_by > 1 else "")

    def _pool_hits(self, pool: Retrieval, k: int):
        """(proponents, opponents, (ids, exact scores, norms) of the pool) of a one-query re-scored pool."""
        found = pool.head(k)

        def side(prefix: str) -> list[DocumentHit]:
            part = {f: getattr(found, f"{prefix}_{f}") for f in ("ids", "exact", "projected", "normalized", "norms")}
            return self._document_hits(part["ids"][0], part["exact"][0], part["projected"][0],
                                       *(None if part[f] is None else part[f][0] for f in ("normalized", "norms")))

        pro, opp = side("proponent"), side("opponent")
        ids = np.concatenate([pool.proponent_ids[0], pool.opponent_ids[0]])
        exact = np.concatenate([pool.proponent_exact[0], pool.opponent_exact[0]])
        norms = (np.concatenate([pool.proponent_norms[0], pool.opponent_norms[0]]) if pool.proponent_norms is not None
                 else self.study.index.norms[ids])
        ids, first = np.unique(ids, return_index=True)
        return (*_signed(pro, opp), (ids.tolist(), exact[first].tolist(), np.asarray(norms)[first].tolist()))

    def trace_many(self, requests: Sequence[tuple[str, str | None]], method: str = "multi-stage", top_k: int = 10,
                   heatmaps: bool = True, exhaustive: bool = False,
                   normalization: str | Normalization | None = None) -> list[Trace]:
        """Trace several (instruction, answer or None) at once. For indexed methods the prompts
        share one backward pass for their query gradients, one index search and one exact
        re-scoring pass over all their candidates; other methods trace one by one."""
        check_method(method)
        norm = self.normalization_for(method, normalization)
        if method not in INDEXED or exhaustive or len(requests) < 2:
            return [self.trace(i, a, method, top_k, heatmaps=heatmaps, exhaustive=exhaustive, normalization=norm)
                    for i, a in requests]
        started = time.perf_counter()
        answers = [a if a and a.strip() else self.generate(i) for i, a in requests]
        if not all(a.strip() for a in answers):
            raise ValueError("the model's answer to a prompt is empty; give that prompt an answer to trace")
        prompts = [self.prompt_for(i) for i, _ in requests]
        for prompt, answer in zip(prompts, answers):
            self._check_answer_fits(prompt, answer)
        generated = time.perf_counter() - started
        k = min(top_k, len(self.study.documents))
        with self._lock:
            t0 = time.perf_counter()
            batch = encode_prompt_answer(self.study.tokenizer, prompts, answers, self.study.config.influence.max_length)
            ft = self.study.finetuned
            query = precondition(sequence_gradients(ft.model, TASK, batch, ft.layers),
                                 self.study.config.influence.score_arguments(method), self.study.pretrained.factors,
                                 ft.factors)
            pool = self.retrieve(query, max(k, self.study.config.influence.candidates), norm)
            shared = time.perf_counter() - t0
            traces = []
            for i, ((instruction, _), prompt, answer) in enumerate(zip(requests, prompts, answers)):
                t0 = time.perf_counter()
                pro, opp, scored = self._pool_hits(pool.row(i), k)
                one = query.select(slice(i, i + 1))
                if heatmaps:
                    self._attach_heatmaps(pro + opp, [h.doc_id for h in pro + opp], one, self.study.pretrained,
                                          self.study.document_batches)
                timings = Timings(generate=generated / len(requests), rank=shared / len(requests),
                                  heatmaps=time.perf_counter() - t0)
                timings.total = timings.generate + timings.rank + timings.heatmaps
                settings = TraceSettings(self.study.config.influence.alpha, k, one.damping,
                                         self._index_retrieval(shared_by=len(requests)), prompt, "",
                                         str(norm), norm.describe())
                traces.append(Trace(instruction.strip(), answer, method, pro, opp, self.answer_pieces(prompt, answer),
                                    settings, timings, *scored))
        return traces

    @staticmethod
    def _ranked(ranked: np.ndarray, exact: np.ndarray, norms: np.ndarray | None, k: int, hits: Callable[..., list]):
        """The k highest and the k lowest by ``ranked``, as ``hits(ids, exact, None, ranked, norms)``
        (``ranked`` is ``exact`` itself for a raw ranking: then no normalised scores are given)."""
        top, bottom = np.argsort(-ranked, kind="stable")[:k], np.argsort(ranked, kind="stable")[:k]
        normalized = norms is not None

        def pick(ids):
            return hits(ids, exact[ids], None, ranked[ids] if normalized else None, norms[ids] if normalized else None)
        return pick(top), pick(bottom)

    def retrieve(self, query: PreconditionedQuery, pool: int, normalization: str | Normalization | None = None,
                 whiten: bool = True) -> Retrieval:
        """Index candidates (``pool`` per sign) for a preconditioned query, re-scored exactly and
        ranked by ``normalization`` (default: ``engine.normalization.DEFAULT``)."""
        norm = self.normalization_for(query.method, normalization)
        pt = self.study.pretrained
        return rescore(self.search_index(query, pool, norm, whiten), pt.model, TASK, pt.layers, query,
                       self.study.document_batches, ranking=self.ranking(query.method, norm, exhaustive=False))

    def search_index(self, query: PreconditionedQuery, pool: int, normalization: str | Normalization | None = None,
                     whiten: bool = True) -> Retrieval:
        """The index's candidates (``pool`` per sign) for a normalised or raw ranking, not yet re-scored."""
        study, method = self.study, query.method
        norm = self.normalization_for(method, normalization)
        if method == "multi-stage" and whiten:  # split (H_pt + lambda)^-1 between sides
            return study.index.search("whitened", study.whitening.query_vectors(query.vectors), pool,
                                      self._search_weights(method, norm, "whitened"))
        # unit-scale rows: cosine as they are, dot products times the exact norms
        return study.index.search("projected", study.projector.project_gradients(query.vectors), pool,
                                  self._search_weights(method, norm, "projected"))

    def baseline_scores(self, prompt: str, answer: str, method: str) -> np.ndarray:
        """Similarity of every document to the prompt and answer (BM25 or representations)."""
        if method == "bm25":
            if self._bm25 is None:
                self._bm25 = BM25(self.study.documents["text"])
            return self._bm25.score_prompt_answer([prompt], [answer])[0]
        model = self.study.finetuned.model
        if self._representations is None:
            self._representations = pooled_representations(
                model, self.study.document_batches(range(len(self.study.documents))), progress=self.progress)
        q = pooled_representations(model, [self._answer_batch(prompt, answer)], progress=False)
        return cosine_similarity(q, self._representations)[0]

    def _document_hits(self, ids, exact, projected=None, normalized=None, norms=None) -> list[DocumentHit]:
        hits = []
        for j, doc_id in enumerate(int(i) for i in ids):
            row = self.study.documents[doc_id]
            hits.append(DocumentHit(doc_id, float(exact[j]), row["title"], row["text"],
                                    projected_score=None if projected is None else float(projected[j]),
                                    normalized_score=None if normalized is None else float(normalized[j]),
                                    norm=None if norms is None else float(norms[j])))
        return hits

    def _attach_heatmaps(self, hits: Sequence[Hit], ids: Sequence[int], query: PreconditionedQuery,
                         side: StageModel, batches_for: Callable[[Sequence[int]], list[dict]]) -> None:
        if not hits:
            return
        start = 0
        for batch in batches_for(ids):
            batch_hits, start = hits[start:start + len(batch["input_ids"])], start + len(batch["input_ids"])
            att = attribute_tokens(side.model, TASK, batch, side.layers, query)
            for b, hit in enumerate(batch_hits):
                n = int(batch["attention_mask"][b].sum())
                hit.tokens = self._pieces(batch["input_ids"][b, :n])
                hit.token_scores = att.token_scores[0, b, :n].double().tolist()
                hit.layer_scores = dict(zip(att.layer_names, att.layer_scores[0, b].double().tolist()))

    def finetune_examples(self, instruction: str, answer: str, top_k: int = 10, context: str = "",
                          heatmaps: bool = True, normalization: str | Normalization | None = None) -> Trace:
        """The fine-tuning records most influential on ``answer`` (single-stage influence).

        Records are the fine-tuned model's own training data, so their gradients are taken at
        theta_ft on the response tokens, exactly as they were trained, and preconditioned with
        (H_ft + lambda I)^-1. Every record is scored exactly (there is no index of records), and
        ranked by ``normalization`` as documents are (its norms measured in the same pass).
        """
        if not answer.strip():
            raise ValueError("there is no answer to trace; trace a prompt first or type an answer")
        norm = self.normalization_for("single-stage", normalization)
        prompt = self.prompt_for(instruction, context)
        started = time.perf_counter()
        ft, records = self.study.finetuned, self.study.records
        k = min(top_k, len(records))
        with self._lock:
            query = self.preconditioned_query(prompt, answer, "single-stage")
            pro, opp, pool = self._score_all(query, ft, self.study.record_batches, len(records),
                                             self.ranking("single-stage", norm, exhaustive=True), k, self._record_hits)
            if heatmaps:
                self._attach_heatmaps(pro + opp, [h.record_id for h in pro + opp], query, ft,
                                      self.study.record_batches)
        timings = Timings(total=time.perf_counter() - started)
        settings = TraceSettings(self.study.config.influence.alpha, k, query.damping,
                                 f"exact, all {len(records)} fine-tuning records", prompt, context,
                                 str(norm), norm.describe())
        return Trace(instruction.strip(), answer, "single-stage", pro, opp,
                     self.answer_pieces(prompt, answer), settings, timings, *pool)

    def _record_hits(self, ids, exact, projected=None, normalized=None, norms=None) -> list[RecordHit]:
        hits = []
        for j, record_id in enumerate(int(i) for i in ids):
            row = self.study.records[record_id]
            text = self.study.prompts.prompt(row["instruction"], row["context"]) + row["response"]
            hits.append(RecordHit(record_id, float(exact[j]), row["instruction"], row["category"], text,
                                  normalized_score=None if normalized is None else float(normalized[j]),
                                  norm=None if norms is None else float(norms[j])))
        return hits

    def answer_token_map(self, prompt: str, answer: str, method: str, doc_id: int) -> AnswerTokenMap:
        """Answer-token x document-token influence for one document."""
        with self._lock:
            query = self.preconditioned_query(prompt, answer, method, per_token=True)
            side = self._document_side(method)
            batch = self.study.document_batches([doc_id])[0]
            att = attribute_tokens(side.model, TASK, batch, side.layers, query)
        return AnswerTokenMap(self.answer_pieces(prompt, answer), self._pieces(batch["input_ids"][0]),
                              att.token_scores[:, 0, :].double().numpy())

    def answer_pieces(self, prompt: str, answer: str) -> list[str]:
        """The answer's tokens as scored (after the prompt), as text pieces."""
        batch = self._answer_batch(prompt, answer)
        return self._pieces(batch["input_ids"][0][batch["labels"][0] != -100])

    def _answer_batch(self, prompt: str, answer: str) -> dict:
        return encode_prompt_answer(self.study.tokenizer, [prompt], [answer],
                                    self.study.config.influence.max_length)

    def _document_side(self, method: str) -> StageModel:
        """Where documents' gradients live: theta_ft for single-stage (documents treated as
        training data of the fine-tuned model), theta_pt otherwise."""
        return self.study.finetuned if method == "single-stage" else self.study.pretrained

    def _pieces(self, ids) -> list[str]:
        return [self.study.tokenizer.decode([int(i)]) for i in ids]


def _signed(pro: list[Hit], opp: list[Hit]) -> tuple[list[Hit], list[Hit]]:
    """Influence has a sign: a proponent raises the answer's log-likelihood, an opponent lowers it."""
    return [h for h in pro if h.score > 0], [h for h in opp if h.score < 0]

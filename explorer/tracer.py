"""Answer a prompt and trace the answer to pretraining documents: the library behind the CLI and app.

A :class:`Tracer` serves one opened study (``engine.study.open_study``) to the CLI and the app: it
checks input, lets the fine-tuned model answer, runs the engine's query (``engine.query``: query
gradient, preconditioning, candidates, exact and normalised scores, token scores) under one lock,
and returns typed results with their timings. Scores follow the project's sign convention:
positive = the document raises the answer's log-likelihood (proponent), negative = lowers it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence

import torch

from engine.methods import MULTI_STAGE
from engine.normalization import Normalization
from engine.query import QueryEngine, Ranking, Target
from engine.study import OpenedStudy, open_study

from .results import AnswerTokenMap, DocumentLookup, Timings, Trace, TraceSettings, document_hits, record_hits

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
        self.engine = QueryEngine(study, progress)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, root: str | os.PathLike, device: str = "auto", progress: bool = False,
             factor_precision: str | None = None) -> Tracer:
        """``factor_precision``: hold both factor sets in float32, bfloat16 or float16 (default: the
        study's ``influence.factor_precision``)."""
        return cls(open_study(root, device, progress=progress, factor_precision=factor_precision), progress)

    # -- answering ------------------------------------------------------------------------------
    def prompt_for(self, instruction: str, context: str = "") -> str:
        return self.study.prompts.prompt(check_prompt(instruction), context)

    @torch.no_grad()
    def generate(self, instruction: str, context: str = "", max_new_tokens: int = 48,
                 temperature: float = 0.0) -> str:
        tokenizer = self.study.tokenizer
        prompt = self.prompt_for(instruction, context)
        self.engine.check_fits(prompt, generated=max_new_tokens)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
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
                      max_new_tokens: int = 48, versus: str | None = None) -> None:
        """Raise ValueError, saying why, unless the request can be traced as it is (nothing is cut)."""
        if versus is not None and not versus.strip():
            raise ValueError("the answer to contrast with (versus) is empty: type the other answer")
        self.engine.check_fits(self.prompt_for(instruction, context), answer if answer and answer.strip() else None,
                               max_new_tokens, versus)

    # -- tracing --------------------------------------------------------------------------------
    def trace(self, instruction: str, answer: str | None = None, method: str = MULTI_STAGE,
              top_k: int = 10, context: str = "", heatmaps: bool = True,
              exhaustive: bool = False, on_stage: Callable[[str], None] | None = None,
              max_new_tokens: int = 48, temperature: float = 0.0,
              normalization: str | Normalization | None = None, versus: str | None = None,
              span: tuple[int, int] | None = None) -> Trace:
        """Answer (unless ``answer`` is given) and rank documents by ``method``.

        Indexed methods retrieve candidates from the study's index and re-score them exactly (the
        candidates can miss true top documents: benchmarks/retrieval.py); ``exhaustive=True`` scores
        every document exactly instead. ``normalization`` (``engine.normalization``; default
        ``engine.methods.DEFAULT_NORMALIZATION``) ranks by score / d(z); every hit keeps its exact
        score beside the normalised one. ``versus``: rank by influence on log p(answer) - log p(versus)
        (why this answer rather than that one); ``span``: on the answer tokens [start, end) alone
        (``engine.query.Target``). ``on_stage`` is told, in words, what starts next.
        """
        return self._traces([(instruction, answer, context, versus, span)], method, top_k, heatmaps, exhaustive,
                            normalization, on_stage or (lambda _: None), max_new_tokens, temperature)[0]

    def trace_many(self, requests: Sequence[tuple[str, str | None] | tuple[str, str | None, str | None]],
                   method: str = MULTI_STAGE, top_k: int = 10, heatmaps: bool = True, exhaustive: bool = False,
                   normalization: str | Normalization | None = None) -> list[Trace]:
        """Trace several (instruction, answer or None[, versus or None]) at once: the prompts share one
        query pass, and for indexed methods one index search and one exact re-scoring pass."""
        return self._traces([(r[0], r[1], "", r[2] if len(r) > 2 else None, None) for r in requests], method,
                            top_k, heatmaps, exhaustive, normalization)

    def _traces(self, requests: list[tuple], method: str, top_k: int, heatmaps: bool, exhaustive: bool,
                normalization: str | Normalization | None, stage: Callable[[str], None] = lambda _: None,
                max_new_tokens: int = 48, temperature: float = 0.0) -> list[Trace]:
        """Traces of (instruction, answer or None, context, versus, span) requests ranked together; the
        shared steps' time is split evenly between them."""
        norm = self.engine.normalization(method, normalization)
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        started = time.perf_counter()
        prepared = [self._prepare(*request, max_new_tokens, temperature, stage) for request in requests]
        answered = any(a is None or not a.strip() for _, a, *_ in requests)
        generate = (time.perf_counter() - started) / len(requests) if answered else None
        with self._lock:
            started = time.perf_counter()
            stage(f"Ranking documents by {method}")
            rankings = self.engine.rank(*zip(*prepared), method, top_k, norm, exhaustive)
            rank = (time.perf_counter() - started) / len(requests)
            retrieval = self.engine.retrieval(method, exhaustive, len(requests))
            traces = []
            for (instruction, _, context, _, _), (prompt, target), ranking in zip(requests, prepared, rankings):
                started = time.perf_counter()
                if heatmaps and ranking.query is not None:
                    stage("Token heatmaps of the top documents")
                timings = Timings(generate, rank)
                traces.append(self._trace(instruction, prompt, context, target, ranking, timings, retrieval,
                                          heatmaps, top_k))
                timings.heatmaps = time.perf_counter() - started
                timings.total = (generate or 0.0) + rank + timings.heatmaps
        return traces

    def _prepare(self, instruction: str, answer: str | None, context: str = "", versus: str | None = None,
                 span: tuple[int, int] | None = None, max_new_tokens: int = 48, temperature: float = 0.0,
                 stage: Callable[[str], None] = lambda _: None) -> tuple[str, Target]:
        """The model's prompt and the checked target of one request: the fine-tuned model answers
        unless ``answer`` is given; a prompt and answer that do not fit are refused, never cut."""
        prompt = self.prompt_for(instruction, context)
        versus = versus if versus is not None and versus.strip() else None  # blank: no contrast
        if versus is not None:
            self.engine.check_fits(prompt, versus=versus)
        if answer is None or not answer.strip():
            stage("The fine-tuned model is answering")
            answer = self.generate(instruction, context, max_new_tokens, temperature)
        if not answer.strip():
            raise ValueError(f"the model's answer to {instruction.strip()[:60]!r} is empty; type an answer to trace")
        self.engine.check_fits(prompt, answer)
        return prompt, Target.make(answer, versus, span)

    def finetune_examples(self, instruction: str, answer: str, top_k: int = 10, context: str = "",
                          heatmaps: bool = True, normalization: str | Normalization | None = None,
                          versus: str | None = None, span: tuple[int, int] | None = None) -> Trace:
        """The fine-tuning records most influential on ``answer`` (single-stage influence, every
        record scored exactly at theta_ft on its response tokens, as it was trained), ranked like
        documents (``normalization``), for the same targets as :meth:`trace`."""
        if not answer.strip():
            raise ValueError("there is no answer to trace; trace a prompt first or type an answer")
        prompt = self.prompt_for(instruction, context)
        target = Target.make(answer, versus, span)
        started = time.perf_counter()
        with self._lock:
            ranking = self.engine.records(prompt, target, top_k, normalization)
            trace = self._trace(instruction, prompt, context, target, ranking, Timings(),
                                f"exact, all {len(self.study.records)} fine-tuning records", heatmaps, top_k,
                                records=True)
        trace.timings.total = time.perf_counter() - started
        return trace

    def _trace(self, instruction: str, prompt: str, context: str, target: Target, ranking: Ranking,
               timings: Timings, retrieval: str, heatmaps: bool, top_k: int, records: bool = False) -> Trace:
        """The typed result of a ranking: hits with titles and texts (and heatmaps), settings."""
        hits = (lambda side: record_hits(side, self.study.records, self.study.prompts)) if records else (
            lambda side: document_hits(side, self.study.documents))
        pro, opp = hits(ranking.proponents), hits(ranking.opponents)
        query, norm = ranking.query, ranking.normalization
        if heatmaps and query is not None:
            self._heatmaps(pro + opp, query, records)
        top_k = min(top_k, len(self.study.records if records else self.study.documents))
        settings = TraceSettings(self.study.config.influence.alpha, top_k, query.damping if query is not None else {},
                                 retrieval, prompt, context, str(norm), norm.describe(), target.describe())
        pool = ranking.pool
        trace = Trace(instruction.strip(), target.answer, ranking.method, pro, opp,
                      self.answer_pieces(prompt, target.answer), settings, timings, pool.ids.tolist(),
                      pool.exact.tolist(), [] if pool.norms is None else pool.norms.tolist(),
                      (pool.exact if pool.normalized is None else pool.normalized).tolist(), target.versus,
                      None if target.versus is None else self.answer_pieces(prompt, target.versus),
                      None if target.span is None else list(target.span))
        for hit in pro + opp:
            trace.place(hit)
        return trace

    # -- any document ---------------------------------------------------------------------------
    def document(self, trace: Trace, doc_id: int, heatmap: bool = True) -> DocumentLookup:
        """Any document's exact score for ``trace``'s answer (its target: contrast and span included)
        under its method and ranking, its token heatmap, and its rank among the trace's scored documents."""
        return self.documents(trace, [doc_id], heatmap)[0]

    def documents(self, trace: Trace, doc_ids: Sequence[int], heatmap: bool = True) -> list[DocumentLookup]:
        """:meth:`document` for several documents: one query pass and one scoring pass for all."""
        target = Target.make(trace.answer, trace.versus, trace.span)
        with self._lock:
            side, query = self.engine.lookup(trace.settings.model_prompt, target, trace.method, doc_ids,
                                             trace.settings.normalization)
            hits = document_hits(side, self.study.documents)
            if heatmap and query is not None:
                self._heatmaps(hits, query)
        return [DocumentLookup(hit, *trace.place(hit), hit.doc_id in trace.pool_ids) for hit in hits]

    def _heatmaps(self, hits, query, records: bool = False) -> None:
        """Each hit's token heatmap and per-layer scores for ``query`` (one pass over their texts)."""
        ids = [h.record_id if records else h.doc_id for h in hits]
        for hit, (tokens, scores, layers) in zip(hits, self.engine.token_scores(query, ids, records)):
            hit.tokens, hit.token_scores, hit.layer_scores = self._pieces(tokens), scores, layers

    def answer_token_map(self, prompt: str, answer: str, method: str, doc_id: int,
                         versus: str | None = None) -> AnswerTokenMap:
        """Answer-token x document-token influence for one document (for a contrastive trace, the
        contrasted answer's tokens follow, negated: the rows add up to the document's score)."""
        with self._lock:
            doc_ids, att = self.engine.answer_token_map(prompt, Target(answer, versus), method, doc_id)
        return AnswerTokenMap(self.answer_pieces(prompt, answer), self._pieces(doc_ids),
                              att.token_scores[:, 0, :].double().numpy(),
                              [] if versus is None else self.answer_pieces(prompt, versus))

    def answer_pieces(self, prompt: str, answer: str) -> list[str]:
        """The answer's tokens as scored (after the prompt), as text pieces."""
        return self._pieces(self.engine.answer_tokens(prompt, answer))

    def _pieces(self, ids) -> list[str]:
        return [self.study.tokenizer.decode([int(i)]) for i in ids]


"""A query, top to bottom: prompt and answer -> query gradient -> preconditioned query -> candidates
-> exact (and normalised) scores -> token scores.

1. The query gradient: grad L_q(theta_ft) of L_q = -log p(answer | prompt), summed over the answer's
   tokens (one row per answer token with ``per_token``: their scores add up to the answer's). A
   :class:`Target` narrows it to a span of the answer's tokens, or contrasts it with another answer:
   L_q = -log p(answer | prompt) + log p(versus | prompt), so a score is the change of
   log p(answer) - log p(versus) ("why this answer rather than that one").
2. Preconditioning: the method's inverses (``engine.methods``) turn it into u; a document's
   influence is <u, grad l(z)>, the change in the answer's log-likelihood per unit of upweighting z.
3. Candidates: an indexed method asks the study's index (``engine.study.index``) for the documents
   whose stored vectors score best for the ranking asked (raw, or divided by the documents' norms:
   ``engine.normalization``); an exhaustive ranking takes every document.
4. Exact scores: one gradient pass over the candidates (or all documents) gives <u, grad l(z)>, the
   documents' norms where the ranking divides by them, and the ranking's order.
5. Token scores: the document's influence split over its tokens (``engine.attribution``).

Baselines (BM25, representation similarity) replace steps 1-4 by a similarity to every document.
Everything here follows the sign convention: positive = raises the answer's log-likelihood.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .attribution import TokenAttribution, attribute_tokens
from .baselines import BM25, cosine_similarity, pooled_representations
from .gradients import sequence_gradients
from .influence import PreconditionedQuery, document_metric, measure_documents, precondition
from .methods import FINETUNED, PRETRAINED, RECORDS_METHOD, Method, method
from .normalization import DEFAULT, Normalization, NormalizedRanking, search_weights
from .projection import KroneckerProjector, Whitening
from .retrieval import Retrieval, rescore
from .study import OpenedStudy, StageModel
from .tasks import IGNORE, LanguageModelingTask
from .text import encode_prompt_answer

TASK = LanguageModelingTask()


@dataclass(frozen=True)
class Target:
    """What a query's influence is measured on: the answer's log-likelihood, over all its tokens or
    over the tokens ``span`` = [start, end) (0-based, as :meth:`QueryEngine.answer_tokens` lists them),
    minus ``versus``'s log-likelihood after the same prompt for a contrastive trace."""

    answer: str
    versus: str | None = None
    span: tuple[int, int] | None = None

    @staticmethod
    def of(value: str | Target) -> Target:
        return value if isinstance(value, Target) else Target(value)

    @staticmethod
    def make(answer: str, versus: str | None = None, span: Sequence[int] | None = None) -> Target:
        """A target from a request's fields: a blank ``versus`` is no contrast; ``span`` as (start, end)."""
        return Target(answer, versus.strip() if versus is not None and versus.strip() else None,
                      None if span is None else (int(span[0]), int(span[1])))

    def check(self, answer_tokens: int) -> None:
        """Raise ValueError, saying why, unless this target can be scored (``answer_tokens``: how many
        tokens the answer has)."""
        if self.versus is not None:
            if not self.versus.strip():
                raise ValueError("the answer to contrast with (versus) is empty")
            if self.versus.strip() == self.answer.strip():
                raise ValueError("the answer to contrast with (versus) is the answer itself: every score would be 0")
        if self.span is None:
            return
        if self.versus is not None:
            raise ValueError("a span scores tokens of one answer; a contrastive trace compares two whole answers: "
                             "give a span or versus, not both")
        start, end = self.span
        if not 0 <= start < end <= answer_tokens:
            raise ValueError(f"the span {start}:{end} is not a range of the answer's {answer_tokens} tokens "
                             f"(START:END with 0 <= START < END <= {answer_tokens})")

    @staticmethod
    def parse_span(text: str) -> tuple[int, int]:
        """A span of answer tokens written START:END (0-based, END excluded), as URLs and the CLI give it."""
        try:
            start, end = (int(x) for x in text.split(":"))
        except ValueError:
            raise ValueError(f"span {text!r} is not START:END (answer token positions such as 2:5)") from None
        if not 0 <= start < end:
            raise ValueError(f"span {text!r} needs 0 <= START < END")
        return start, end

    def describe(self) -> str:
        """What the scores measure, in words."""
        if self.versus is not None:
            return "log p(answer) - log p(versus)"
        if self.span is not None:
            return f"log p(answer tokens {self.span[0]}:{self.span[1]})"
        return "log p(answer)"


@dataclass
class Side:
    """One sign's ranked documents (or records): ids with their exact scores, and, when the ranking
    is normalised, the scores it was ordered by and the norms it divided by."""

    ids: np.ndarray
    exact: np.ndarray  # influence (log-likelihood units), or a baseline's similarity
    normalized: np.ndarray | None = None  # exact / d(z)
    norms: np.ndarray | None = None  # n(z)
    projected: np.ndarray | None = None  # the index's estimate, where it proposed them


@dataclass
class Ranking:
    """One query's ranking: the best ``k`` of each sign and every item it scored (the pool)."""

    method: str
    normalization: Normalization
    proponents: Side  # influence > 0: raise the answer's log-likelihood (baselines: most similar)
    opponents: Side  # influence < 0 (baselines: least similar, unsigned)
    pool: Side  # every item scored exactly: the candidates, or the whole corpus; norms = n(z) or |grad|;
    # normalized = what a normalised ranking ordered them by
    query: PreconditionedQuery | None  # this query's u (None for baselines)


class QueryEngine:
    """Queries over one opened study. Not thread-safe: callers serialise queries (the explorer's
    Tracer holds a lock). Caches what a study computes once (BM25, document representations)."""

    def __init__(self, study: OpenedStudy, progress: bool = False):
        self.study = study
        self.progress = progress
        self._bm25: BM25 | None = None
        self._representations: np.ndarray | None = None
        self._weights: dict[tuple, np.ndarray | None] = {}

    # -- 1-2: the query ---------------------------------------------------------------------------
    def preconditioned(self, prompts: Sequence[str], answers: Sequence[str | Target], name: str,
                       per_token: bool = False) -> PreconditionedQuery:
        """u for each (prompt, answer or :class:`Target`); with ``per_token``, one row per scored token
        of a single target (a contrastive target's ``versus`` tokens follow, negated: the rows add up to
        the target's score)."""
        return precondition(self.query_gradients(prompts, answers, per_token),
                            self.study.config.influence.score_arguments(name), self.study.pretrained.factors,
                            self.study.finetuned.factors)

    def query_gradients(self, prompts: Sequence[str], answers: Sequence[str | Target],
                        per_token: bool = False) -> dict:
        """grad L_q(theta_ft) per target (Q, out, in[+1]): the answer's (or its span's) loss gradient,
        minus the contrasted answer's."""
        targets = [Target.of(a) for a in answers]
        batch = self._encode(prompts, [t.answer for t in targets])
        for row, t in enumerate(targets):
            t.check(int((batch["labels"][row] != IGNORE).sum()))
            if t.span is not None:
                _keep_span(batch["labels"][row], *t.span)
        contrasted = [i for i, t in enumerate(targets) if t.versus is not None]
        if per_token:
            if contrasted and len(targets) != 1:
                raise ValueError("per-token rows of a contrastive target are for one target at a time")
            batch, _ = TASK.split_targets(batch)
        grads = self._gradients(batch)
        if not contrasted:
            return grads
        other = self._encode([prompts[i] for i in contrasted], [targets[i].versus for i in contrasted])
        if per_token:
            minus = self._gradients(TASK.split_targets(other)[0])
            return {k: torch.cat([g, -minus[k]]) for k, g in grads.items()}
        minus = self._gradients(other)
        for k, g in grads.items():
            g[contrasted] -= minus[k]
        return grads

    def check_fits(self, prompt: str, answer: str | None = None, generated: int | None = None,
                   versus: str | None = None) -> None:
        """Raise ValueError, saying by how much, unless the model's ``prompt`` followed by ``answer``
        (or by ``generated`` new tokens), and followed by ``versus``, fits the study's context:
        queries see the whole prompt or nothing, never a cut one."""
        prompt_tokens = len(self._tokens(prompt))
        wanted = []
        if answer is not None:
            wanted.append(("the answer's", len(self._tokens(answer))))
        elif generated is not None:
            wanted.append(("a generated answer of up to", generated))
        if versus is not None:
            wanted.append(("the contrasted answer's", len(self._tokens(versus))))
        limit = self.study.config.influence.max_length
        for what, answer_tokens in wanted:
            if prompt_tokens + answer_tokens > limit:
                raise ValueError(f"the prompt does not fit the study's context of {limit} tokens "
                                 f"(influence.max_length): it is {prompt_tokens} tokens with the template, plus "
                                 f"{what} {answer_tokens}; shorten it by at least "
                                 f"{prompt_tokens + answer_tokens - limit} tokens")

    def _tokens(self, text: str) -> list[int]:
        return self.study.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode(self, prompts: Sequence[str], answers: Sequence[str]) -> dict:
        return encode_prompt_answer(self.study.tokenizer, list(prompts), list(answers),
                                    self.study.config.influence.max_length)

    def _gradients(self, batch: dict) -> dict:
        ft = self.study.finetuned
        return sequence_gradients(ft.model, TASK, batch, ft.layers)

    def side(self, spec: Method) -> StageModel:
        """The model a method scores documents at: theta_pt, or theta_ft for single-stage."""
        return self.study.finetuned if spec.documents_at == FINETUNED else self.study.pretrained

    # -- 3-4: the ranking -------------------------------------------------------------------------
    def normalization(self, name: str, spec: str | Normalization | None = None) -> Normalization:
        """The ranking a method's trace uses: ``spec``, or the default for influence methods; raw for
        the baselines (similarities) and cosine (normalised already)."""
        m = method(name)
        if not m.normalizable:
            if spec is not None and not Normalization.parse(spec).is_raw:
                raise ValueError(f"{name} ranks by {'similarity' if m.is_baseline else 'cosine'} already; "
                                 "it takes no normalisation (use none)")
            return Normalization()
        norm = Normalization.parse(DEFAULT if spec is None else spec)
        if norm.norm == "whitened" and m.documents_at != PRETRAINED:
            raise ValueError(f"whitened norms are stored for documents at theta_pt; {name} scores them at "
                             "theta_ft: use gradient or metric")
        return norm

    def normalized_ranking(self, name: str, norm: Normalization, exhaustive: bool) -> NormalizedRanking | None:
        """Where a normalised ranking's norms come from: the scoring pass (gradient, metric) or the
        index (whitened); the floor and the zero guard from every document's stored norm, where stored."""
        if norm.is_raw:
            return None
        index, m = self.study.index, method(name)
        metric = document_metric(self.study.config.influence.score_arguments(name), self.study.pretrained.factors,
                                 self.study.finetuned.factors)
        if norm.norm == "whitened":
            return NormalizedRanking(norm, lambda ids, _: index.whitened_norms[ids], index.whitened_norms)
        if norm.norm == "metric" and metric is not None:
            if norm.floor is not None and not exhaustive:
                raise ValueError("a floor under the metric norm needs every document's metric norm: score "
                                 "exhaustively, or use whitened@median (the index's estimate of that norm)")
            return NormalizedRanking(norm, lambda ids, measured: measured.metric_sq_norms.numpy() ** 0.5, None, metric)
        stored = index.norms.astype(np.float64) if m.documents_at == PRETRAINED else None
        return NormalizedRanking(norm, lambda ids, measured: measured.sq_norms.numpy() ** 0.5, stored)  # gradient

    def search_weights(self, name: str, norm: Normalization, vectors: str) -> np.ndarray | None:
        """Per-document weights of the index's scores of ``vectors``: projected rows are unit-scale
        (times the exact norm for raw gradients); a normalised ranking divides by the index's estimate
        of d(z). Computed once per (method, ranking, vectors): O(documents) each."""
        key = (name, str(norm), vectors)
        if key not in self._weights:
            self._weights[key] = self._search_weights(name, norm, vectors)
        return self._weights[key]

    def _search_weights(self, name: str, norm: Normalization, vectors: str) -> np.ndarray | None:
        index = self.study.index
        return search_weights(method(name), norm, vectors, index.norms, index.whitened_norms)

    def candidates(self, query: PreconditionedQuery, pool: int, norm: Normalization,
                   vectors: str | None = None) -> Retrieval:
        """The index's ``pool`` best documents per sign for this ranking (not yet scored exactly), from
        the method's vectors (or, for an ablation, the other kind)."""
        study, kind = self.study, vectors or method(query.method).vectors
        searched = index_vectors(kind, query, study.whitening, study.projector)
        return study.index.search(kind, searched, pool, self.search_weights(query.method, norm, kind))

    def rank(self, prompts: Sequence[str], answers: Sequence[str | Target], name: str, k: int,
             normalization: str | Normalization | None = None, exhaustive: bool = False) -> list[Ranking]:
        """Each (prompt, answer or :class:`Target`)'s best ``k`` documents per sign. Indexed methods:
        one query pass, one index search and one exact re-scoring pass shared by all prompts; others:
        every document scored exactly (one pass per prompt)."""
        m, norm = method(name), self.normalization(name, normalization)
        k = min(k, len(self.study.documents))
        if m.is_baseline:
            return [self._baseline(p, _plain(a, name), name, k) for p, a in zip(prompts, answers)]
        query = self.preconditioned(prompts, answers, name)
        ranking = self.normalized_ranking(name, norm, exhaustive or not m.indexed)
        if not m.indexed or exhaustive:
            return [self.score_all(query.select(slice(i, i + 1)), self.side(m), self.study.document_batches,
                                   len(self.study.documents), ranking, k, norm) for i in range(len(prompts))]
        found = self.retrieve(query, max(k, self.study.config.influence.candidates), norm)
        return [self._from_retrieval(found.row(i), query.select(slice(i, i + 1)), norm, k)
                for i in range(len(prompts))]

    def retrieve(self, query: PreconditionedQuery, pool: int, normalization: str | Normalization | None = None,
                 vectors: str | None = None) -> Retrieval:
        """The index's ``pool`` candidates per sign, re-scored exactly in one pass and ordered by the
        ranking (``Retrieval.*_exact``, and ``*_normalized`` for a normalised one)."""
        norm = self.normalization(query.method, normalization)
        pt = self.study.pretrained
        return rescore(self.candidates(query, pool, norm, vectors), pt.model, TASK, pt.layers, query,
                       self.study.document_batches, ranking=self.normalized_ranking(query.method, norm, False))

    def score_all(self, query: PreconditionedQuery, side: StageModel, batches_for: Callable, count: int,
                  ranking: NormalizedRanking | None, k: int, norm: Normalization) -> Ranking:
        """Every item (documents, or fine-tuning records) scored exactly in one pass, then ranked."""
        pool = self._measure(query, side, batches_for, np.arange(count), ranking, self.progress)
        ordered = pool.exact if pool.normalized is None else pool.normalized
        norms = None if pool.normalized is None else pool.norms
        return Ranking(query.method, norm, *_best(pool.ids, pool.exact, ordered, norms, k, signed=True), pool, query)

    def score_documents(self, query: PreconditionedQuery, ids: Sequence[int],
                        normalization: str | Normalization | None = None) -> Side:
        """Any documents' exact scores for one query row, with what the ranking ``normalization`` orders
        them by and the norms it divides by (a ranking whose floor needs every document's norm gives
        the exact scores alone)."""
        norm = self.normalization(query.method, normalization)
        try:
            ranking = self.normalized_ranking(query.method, norm, exhaustive=False)
        except ValueError:  # metric with a floor: the floor comes from every document
            ranking = None
        return self._measure(query, self.side(method(query.method)), self.study.document_batches,
                             np.asarray(ids, np.int64), ranking, False)

    def _measure(self, query: PreconditionedQuery, side: StageModel, batches_for: Callable, ids: np.ndarray,
                 ranking: NormalizedRanking | None, progress: bool) -> Side:
        """Items ``ids`` scored exactly in one pass: exact scores, and the normalised ones with their
        norms (or, for a raw ranking, the gradient norms)."""
        measured = measure_documents(side.model, TASK, batches_for(ids), side.layers, query,
                                     progress=progress, metric=ranking.metric if ranking else None)
        exact = measured.scores[0].numpy()
        gradient_norms = np.sqrt(measured.sq_norms.numpy())
        if query.normalize_documents:
            exact = exact / gradient_norms.clip(min=1e-30)
        if ranking is None:
            return Side(ids, exact, norms=gradient_norms)
        normalized, norms = ranking.scored(ids, measured, exact)
        return Side(ids, exact, normalized, norms)

    def find_documents(self, words: str, k: int = 10) -> list[int]:
        """Document ids for words typed by a user: a number is that document; other words are matched
        by BM25 over the corpus, the ``k`` best first (none: no word matches)."""
        words = words.strip()
        if words.isdigit():
            self.check_document(int(words))
            return [int(words)]
        if not words:
            raise ValueError("type words from the document, or its id")
        scores = self._lexical().score([words])[0]
        order = np.argsort(-scores, kind="stable")[:k]
        return [int(i) for i in order[scores[order] > 0]]

    def check_document(self, doc_id: int) -> None:
        if not 0 <= doc_id < len(self.study.documents):
            raise ValueError(f"there is no document {doc_id}: the study's documents are 0 to "
                             f"{len(self.study.documents) - 1}")

    def lookup(self, prompt: str, answer: str | Target, name: str, ids: Sequence[int],
               normalization: str | Normalization | None = None) -> tuple[Side, PreconditionedQuery | None]:
        """Any documents' exact scores under ``name`` and its ranking ``normalization`` (a baseline's
        similarities), with the query for their token scores (None for a baseline): one query pass
        and one scoring pass for all."""
        for doc_id in ids:
            self.check_document(int(doc_id))
        ids = np.asarray(ids, np.int64)
        if method(name).is_baseline:
            return Side(ids, self.baseline_scores(prompt, _plain(answer, name), name)[ids]), None
        query = self.preconditioned([prompt], [answer], name)
        return self.score_documents(query, ids, normalization), query

    def retrieval(self, name: str, exhaustive: bool = False, shared_by: int = 1) -> str:
        """How a ranking's documents are found, in words."""
        if not method(name).indexed or exhaustive:
            return "exact, all documents"
        text = f"index candidates ({self.study.config.influence.candidates} per sign) re-scored exactly"
        return text + (f", in one pass shared by {shared_by} prompts" if shared_by > 1 else "")

    def _lexical(self) -> BM25:
        if self._bm25 is None:
            self._bm25 = BM25(self.study.documents["text"])
        return self._bm25

    def records(self, prompt: str, answer: str | Target, k: int, normalization: str | Normalization | None = None
                ) -> Ranking:
        """The fine-tuning records ranked by single-stage influence on the answer: their gradients at
        theta_ft on the response tokens (as trained), every record scored exactly."""
        norm = self.normalization(RECORDS_METHOD, normalization)
        query = self.preconditioned([prompt], [answer], RECORDS_METHOD)
        return self.score_all(query, self.study.finetuned, self.study.record_batches, len(self.study.records),
                              self.normalized_ranking(RECORDS_METHOD, norm, exhaustive=True),
                              min(k, len(self.study.records)), norm)

    def _from_retrieval(self, found: Retrieval, query: PreconditionedQuery, norm: Normalization, k: int) -> Ranking:
        """One query's re-scored candidates as a ranking (positive proponents, negative opponents)."""
        def side(prefix: str) -> Side:
            part = [getattr(found, f"{prefix}_{f}") for f in ("ids", "exact", "normalized", "norms", "projected")]
            ids, exact, normalized, norms, projected = (None if p is None else p[0] for p in part)
            keep = (exact > 0 if prefix == "proponent" else exact < 0)
            keep[k:] = False
            rest = (None if v is None else v[keep] for v in (normalized, norms, projected))
            return Side(ids[keep], exact[keep], *rest)

        ids = np.concatenate([found.proponent_ids[0], found.opponent_ids[0]])
        exact = np.concatenate([found.proponent_exact[0], found.opponent_exact[0]])
        norms = (self.study.index.norms[ids].astype(np.float64) if found.proponent_norms is None
                 else np.concatenate([found.proponent_norms[0], found.opponent_norms[0]]))
        normalized = (None if found.proponent_normalized is None
                      else np.concatenate([found.proponent_normalized[0], found.opponent_normalized[0]]))
        ids, first = np.unique(ids, return_index=True)
        pool = Side(ids, exact[first], None if normalized is None else normalized[first], norms[first])
        return Ranking(query.method, norm, side("proponent"), side("opponent"), pool, query)

    def _baseline(self, prompt: str, answer: str, name: str, k: int) -> Ranking:
        scores = self.baseline_scores(prompt, answer, name)
        every = np.arange(len(scores))
        return Ranking(name, Normalization(), *_best(every, scores, scores, None, k, signed=False),
                       Side(every, scores), None)

    def baseline_scores(self, prompt: str, answer: str, name: str) -> np.ndarray:
        """Similarity of every document to the prompt and answer (BM25 or representations)."""
        if method(name).similarity == "lexical":
            return self._lexical().score_prompt_answer([prompt], [answer])[0]
        model = self.study.finetuned.model
        if self._representations is None:
            self._representations = pooled_representations(
                model, self.study.document_batches(range(len(self.study.documents))), progress=self.progress)
        batch = encode_prompt_answer(self.study.tokenizer, [prompt], [answer], self.study.config.influence.max_length)
        return cosine_similarity(pooled_representations(model, [batch], progress=False), self._representations)[0]

    # -- 5: token scores --------------------------------------------------------------------------
    def token_scores(self, query: PreconditionedQuery, ids: Sequence[int], records: bool = False
                     ) -> list[tuple[list[int], list[float], dict[str, float]]]:
        """(token ids, per-token influence, per-layer influence) of each document (or record) for one
        query row; the token scores of a document add up to its exact score."""
        side = self.side(method(query.method)) if not records else self.study.finetuned
        batches_for = self.study.record_batches if records else self.study.document_batches
        out = []
        for batch in batches_for(list(ids)) if len(ids) else []:
            att = attribute_tokens(side.model, TASK, batch, side.layers, query)
            for b in range(len(batch["input_ids"])):
                n = int(batch["attention_mask"][b].sum())
                out.append((batch["input_ids"][b, :n].tolist(), att.token_scores[0, b, :n].double().tolist(),
                            dict(zip(att.layer_names, att.layer_scores[0, b].double().tolist()))))
        return out

    def answer_token_map(self, prompt: str, answer: str | Target, name: str, doc_id: int
                         ) -> tuple[list[int], TokenAttribution]:
        """The document's influence on each answer token, per document token: (document token ids,
        attribution with token_scores (answer tokens, 1, document tokens)); a contrastive target's
        ``versus`` tokens follow the answer's, with the sign they carry in the difference."""
        query = self.preconditioned([prompt], [answer], name, per_token=True)
        side = self.side(method(name))
        batch = self.study.document_batches([doc_id])[0]
        return batch["input_ids"][0].tolist(), attribute_tokens(side.model, TASK, batch, side.layers, query)

    def answer_tokens(self, prompt: str, answer: str) -> list[int]:
        """The answer's token ids as scored (after the prompt)."""
        batch = encode_prompt_answer(self.study.tokenizer, [prompt], [answer], self.study.config.influence.max_length)
        return batch["input_ids"][0][batch["labels"][0] != -100].tolist()


def _plain(answer: str | Target, name: str) -> str:
    """The answer text for a baseline, which ranks by similarity to it: spans and contrasts need influence."""
    target = Target.of(answer)
    if target.versus is not None or target.span is not None:
        raise ValueError(f"{name} ranks by similarity to the prompt and answer; a contrastive trace or an "
                         "answer span needs an influence method")
    return target.answer


def _keep_span(labels: torch.Tensor, start: int, end: int) -> None:
    """Score only the answer tokens [start, end) of one row (in place): the others lose their label."""
    scored = (labels != IGNORE).nonzero().flatten()
    labels[scored[:start]] = IGNORE
    labels[scored[end:]] = IGNORE


def index_vectors(kind: str, query: PreconditionedQuery, whitening: Whitening, projector: KroneckerProjector):
    """The query's side of the index's ``kind`` of vectors: the whitened coordinates (the pretraining
    inverse split between the query and the documents) or the Kronecker projection."""
    if kind == "whitened":
        return whitening.query_vectors(query.vectors)
    return projector.project_gradients(query.vectors)


def _best(ids: np.ndarray, exact: np.ndarray, ordered: np.ndarray, norms: np.ndarray | None, k: int,
          signed: bool) -> tuple[Side, Side]:
    """The k highest and k lowest by ``ordered`` (normalised scores, or ``exact`` itself): for influence
    (``signed``) proponents must raise the log-likelihood and opponents lower it."""
    normalized = ordered if norms is not None else None
    sides = []
    for order, keep in ((np.argsort(-ordered, kind="stable")[:k], exact > 0),
                        (np.argsort(ordered, kind="stable")[:k], exact < 0)):
        if signed:
            order = order[keep[order]]
        sides.append(Side(ids[order], exact[order], None if normalized is None else normalized[order],
                          None if norms is None else norms[order]))
    return sides[0], sides[1]

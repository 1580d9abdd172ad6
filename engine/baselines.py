"""Baselines without gradients: lexical overlap (BM25) and representation similarity.

Both return scores (Q, N) with higher = more related; neither has a sign meaning "opponent".

BM25 (Okapi, k1 = 1.5, b = 0.75), own implementation over a sparse document-term matrix:

    score(D, Q) = sum_{distinct terms q in Q} idf(q) * tf(q, D) (k1 + 1) / (tf(q, D) + k1 (1 - b + b |D| / avgdl))
    idf(q)      = ln(1 + (N - df(q) + 0.5) / (df(q) + 0.5))        (Lucene's form, never negative)

Tokenisation (:func:`bm25_tokenize`): lower-case, then maximal runs of Unicode word characters
(regex ``\\w+``: letters, digits, underscore); no stemming, no stop words. |D| counts those tokens.
The query text is the prompt and the answer joined by a newline (:meth:`BM25.score_prompt_answer`).

Representation similarity: cosine between mean-pooled last hidden states (the base model's
``last_hidden_state``, after the final layer norm) over real tokens (attention mask), the query
(prompt + answer by default; ``query_tokens="answer"`` pools answer tokens only) and each
document under the same model (the fine-tuned one).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy import sparse
from torch import nn
from tqdm.auto import tqdm

from .gradients import model_device, to_device
from .tasks import IGNORE

_WORD = re.compile(r"\w+")


def bm25_tokenize(text: str) -> list[str]:
    """Lower-cased maximal runs of Unicode word characters."""
    return _WORD.findall(text.lower())


class BM25:
    """Okapi BM25 over a fixed corpus; :meth:`score` gives (Q, N) for query texts."""

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = float(k1), float(b)
        self.vocabulary: dict[str, int] = {}
        rows, cols, counts = [], [], []
        lengths = np.zeros(len(texts))
        for i, text in enumerate(texts):
            tokens = bm25_tokenize(text)
            lengths[i] = len(tokens)
            terms, tf = np.unique([self.vocabulary.setdefault(t, len(self.vocabulary)) for t in tokens],
                                  return_counts=True)
            rows.append(np.full(len(terms), i))
            cols.append(terms)
            counts.append(tf)
        n, v = len(texts), len(self.vocabulary)
        def join(parts, dtype):
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        tf = sparse.csr_matrix((join(counts, np.float64), (join(rows, np.int64), join(cols, np.int64))),
                               shape=(n, v))
        df = np.bincount(tf.indices, minlength=v)
        self.num_documents, self.lengths = n, lengths
        self.average_length = lengths.mean() if n else 0.0
        self.idf = np.log1p((n - df + 0.5) / (df + 0.5))
        # weights[i, q] = idf(q) tf (k1 + 1) / (tf + k1 (1 - b + b |D_i| / avgdl)): one sparse matrix,
        # so a query's scores are a sparse row-sum over its distinct terms.
        norm = self.k1 * (1 - self.b + self.b * lengths / max(self.average_length, 1e-30))
        tf = tf.tocoo()
        data = self.idf[tf.col] * tf.data * (self.k1 + 1) / (tf.data + norm[tf.row])
        self.weights = sparse.csr_matrix((data, (tf.row, tf.col)), shape=(n, v)).T.tocsr()  # (V, N)

    def score(self, queries: Sequence[str]) -> np.ndarray:
        """(Q, N) float64; terms not in the corpus add nothing."""
        rows, cols = [], []
        for q, text in enumerate(queries):
            terms = {self.vocabulary[t] for t in bm25_tokenize(text) if t in self.vocabulary}
            rows.extend([q] * len(terms))
            cols.extend(sorted(terms))
        indicator = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)),
                                      shape=(len(queries), len(self.vocabulary)))
        return np.asarray((indicator @ self.weights).todense()).reshape(len(queries), self.num_documents)

    def score_prompt_answer(self, prompts: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        """(Q, N) for query text = prompt + newline + answer."""
        if len(prompts) != len(answers):
            raise ValueError("one answer per prompt")
        return self.score([f"{p}\n{a}" for p, a in zip(prompts, answers)])


def _pool_mask(batch: dict, tokens: str) -> torch.Tensor:
    if tokens == "all":
        return batch["attention_mask"].bool()
    if tokens == "answer":
        return batch["labels"] != IGNORE  # answer tokens of a prompt-answer batch
    raise ValueError(f"tokens must be 'all' or 'answer', got {tokens!r}")


def pooled_representations(model: nn.Module, loader: Iterable[dict], tokens: str = "all",
                           progress: bool = True) -> np.ndarray:
    """(N, H) mean of the last hidden state over the chosen real tokens of each sequence.

    float64 for a float64 model, float32 otherwise. ``tokens="all"``: every attended token;
    ``"answer"``: tokens whose label is scored (the answer of :func:`engine.encode_prompt_answer`).
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    parts = []
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="representations", disable=not progress, unit="batch",
                              leave=False):
                batch = to_device(batch, device)
                hidden = model.base_model(input_ids=batch["input_ids"],
                                          attention_mask=batch.get("attention_mask")).last_hidden_state
                hidden = hidden if hidden.dtype == torch.float64 else hidden.float()
                mask = _pool_mask(batch, tokens).to(hidden.dtype).unsqueeze(-1)
                count = mask.sum(1)
                if (count == 0).any():
                    raise ValueError("a sequence has no token to pool")
                parts.append(((hidden * mask).sum(1) / count).cpu().numpy())
    finally:
        model.train(was_training)
    if not parts:
        return np.zeros((0, model.config.hidden_size), np.float32)
    return np.concatenate(parts)


def cosine_similarity(queries: np.ndarray, documents: np.ndarray) -> np.ndarray:
    """(Q, N) cosine between rows of ``queries`` (Q, H) and ``documents`` (N, H)."""
    def unit(x):
        x = np.asarray(x, dtype=np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-30)
    return unit(queries) @ unit(documents).T


def representation_similarity(model: nn.Module, query_batch: dict, doc_loader: Iterable[dict],
                              query_tokens: str = "all", progress: bool = True) -> np.ndarray:
    """(Q, N) cosine of mean-pooled last hidden states, query vs each document, same model.

    Documents stream batch by batch; only their (N, H) pooled vectors are kept.
    """
    q = pooled_representations(model, [query_batch], tokens=query_tokens, progress=False)
    docs = pooled_representations(model, doc_loader, tokens="all", progress=progress)
    return cosine_similarity(q, docs)

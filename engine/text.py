"""Turning text into language-modelling batches (labels = -100 where a token is not scored)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from .tasks import IGNORE


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else (tokenizer.eos_token_id or 0)


def _collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) rows into a batch."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def shortest_first(batches: Iterable[dict[str, torch.Tensor]], window: int = 4096
                   ) -> Iterator[tuple[dict[str, torch.Tensor], list[int]]]:
    """The rows of right-padded ``batches`` re-batched shortest first, about ``window`` rows at a
    time, each new batch with the input positions of its rows. No batch holds more rows or more
    tokens (padding included) than the largest input batch of its window, so memory stays as the
    caller sized it, while rows of similar length pad little: the 300 candidates of a query in a
    32k-document haystack were 17,078 tokens in id order for 8,336 real ones. Batches with keys
    other than input_ids, attention_mask and labels pass through as they are."""
    start = 0
    for group in _windows(batches, window):
        if isinstance(group, dict):
            yield group, list(range(start, start + len(group["input_ids"])))
            start += len(group["input_ids"])
        else:
            yield from _repacked(group, start)
            start += sum(len(b["input_ids"]) for b in group)


def _windows(batches: Iterable[dict], window: int) -> Iterator[dict | list[dict]]:
    """Lists of consecutive repackable batches of about ``window`` rows, and the others alone."""
    group: list[dict] = []
    for batch in batches:
        if set(batch) - {"input_ids", "attention_mask", "labels"} or not _right_padded(batch["attention_mask"]):
            if group:
                yield group
            group = []
            yield batch
            continue
        group.append(batch)
        if sum(len(b["input_ids"]) for b in group) >= window:
            yield group
            group = []
    if group:
        yield group


def _repacked(group: list[dict], start: int) -> Iterator[tuple[dict[str, torch.Tensor], list[int]]]:
    rows = [(b["input_ids"][r, :n].tolist(), b["labels"][r, :n].tolist())
            for b in group for r, n in enumerate(b["attention_mask"].sum(1).tolist())]
    rows_cap = max(len(b["input_ids"]) for b in group)
    tokens_cap = max(b["input_ids"].numel() for b in group)
    pad = next((int(b["input_ids"][b["attention_mask"] == 0][0]) for b in group
                if bool((b["attention_mask"] == 0).any())), 0)  # masked: its value changes no score
    taken: list[int] = []
    for i in sorted(range(len(rows)), key=lambda i: len(rows[i][0])):
        if taken and (len(taken) == rows_cap or len(rows[i][0]) * (len(taken) + 1) > tokens_cap):
            yield _collate([rows[j] for j in taken], pad), [start + j for j in taken]
            taken = []
        taken.append(i)
    if taken:
        yield _collate([rows[j] for j in taken], pad), [start + j for j in taken]


def _right_padded(mask: torch.Tensor) -> bool:
    """Every row's real tokens come first (what :func:`_collate` makes)."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def encode_documents(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Pretraining-style batch of all ``texts``: every real token is scored."""
    if not texts:
        raise ValueError("no documents to encode")
    return next(encode_document_batches(tokenizer, texts, max_length, batch_size=len(texts)))


def _document_row(text: str, ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a pretraining document: truncated, every token scored."""
    ids = ids[:max_length]
    if len(ids) < 2:
        raise ValueError(f"document too short to score (needs 2+ tokens): {text[:40]!r}")
    return ids, list(ids)


def encode_document_batches(tokenizer, texts: Sequence[str], max_length: int, max_tokens: int | None = None,
                            *, batch_size: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Pretraining-style batches of ``texts`` in order, each with at most ``batch_size`` documents
    and at most ``max_tokens`` tokens counting padding (short documents share a batch: few large
    batches beat many small ones). Texts are tokenized a chunk at a time, so a corpus of any size
    streams."""
    if max_tokens is None and batch_size is None:
        raise ValueError("give max_tokens, batch_size or both")
    pad = _pad_id(tokenizer)
    rows: list[tuple[list[int], list[int]]] = []
    width = 0
    for text, ids in _tokenized(tokenizer, texts):
        row = _document_row(text, ids, max_length)
        wider = max(width, len(row[0]))
        if rows and (len(rows) == batch_size or (max_tokens and wider * (len(rows) + 1) > max_tokens)):
            yield _collate(rows, pad)
            rows, wider = [], len(row[0])
        rows.append(row)
        width = wider
    if rows:
        yield _collate(rows, pad)


def _tokenized(tokenizer, texts: Sequence[str], chunk: int = 512) -> Iterator[tuple[str, list[int]]]:
    for start in range(0, len(texts), chunk):
        part = list(texts[start:start + chunk])
        yield from zip(part, tokenizer(part, add_special_tokens=False)["input_ids"])


def encode_prompt_answer(tokenizer, prompts: Sequence[str], answers: Sequence[str],
                         max_length: int) -> dict[str, torch.Tensor]:
    """Instruction-style batch: only answer tokens are scored (the query loss -log p(y | x)).

    When prompt + answer exceed ``max_length`` the prompt is cut from the left, so the answer
    and the text right before it are kept.
    """
    if len(prompts) != len(answers):
        raise ValueError("one answer per prompt")
    rows = []
    for prompt, answer in zip(prompts, answers):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not a:
            raise ValueError("the answer is empty: there is nothing to attribute")
        if len(a) >= max_length:
            raise ValueError(f"the answer has {len(a)} tokens; the limit is {max_length - 1}")
        p = p[-(max_length - len(a)):]
        if not p:
            raise ValueError("the prompt is empty")
        rows.append((p + a, [IGNORE] * len(p) + a))
    return _collate(rows, _pad_id(tokenizer))

"""Corpora through the datasets library: hub names or local files, limited, optionally streamed."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import datasets

from engine.study import DatasetConfig, FinetuneDataConfig

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text",
             ".csv": "csv", ".arrow": "arrow"}


def _load(spec: DatasetConfig):
    path = Path(spec.path)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS) if path.is_dir() else [path]
        if not files:
            raise ValueError(f"{spec.path}: no .jsonl/.json/.parquet/.txt/.csv files found")
        builder = _BUILDERS.get(files[0].suffix)
        if builder is None:
            raise ValueError(f"{spec.path}: unsupported file type {files[0].suffix!r}")
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split=spec.split,
                                     streaming=spec.streaming)
    return datasets.load_dataset(spec.path, spec.name or None, split=spec.split,
                                 streaming=spec.streaming)


def _rows(spec: DatasetConfig) -> Iterator[dict]:
    ds = _load(spec)
    if spec.limit:
        ds = ds.take(spec.limit) if spec.streaming else ds.select(range(min(spec.limit, len(ds))))
    yield from ds


def _field(row: dict, name: str, spec_name: str, required: bool = True) -> str:
    if name and name in row:
        return "" if row[name] is None else str(row[name])
    if required:
        raise ValueError(f"the dataset has no field {name!r} (set {spec_name}); fields: {sorted(row)}")
    return ""


def load_documents(spec: DatasetConfig) -> datasets.Dataset:
    """Pretraining documents as a Dataset with ``doc_id``, ``title``, ``text`` (empty texts dropped);
    the files of ``spec.more`` follow ``spec.path``'s documents, in order."""
    out = {"doc_id": [], "title": [], "text": []}
    sources = [spec] + [replace(spec, path=p, name="", limit=0, more=[]) for p in spec.more]
    for row in (row for source in sources for row in _rows(source)):
        text = _field(row, spec.text_field, "text_field")
        if not text.strip():
            continue
        out["doc_id"].append(len(out["doc_id"]))
        out["title"].append(_field(row, spec.title_field, "title_field", required=False))
        out["text"].append(text)
    if not out["text"]:
        raise ValueError(f"{spec.path}: no non-empty documents")
    return datasets.Dataset.from_dict(out)


def load_finetune_records(spec: FinetuneDataConfig) -> datasets.Dataset:
    """Fine-tuning records in dolly-15k format: instruction, context, response, category."""
    out = {"record_id": [], "instruction": [], "context": [], "response": [], "category": []}
    for row in _rows(spec):
        instruction = _field(row, spec.instruction_field, "instruction_field")
        response = _field(row, spec.response_field, "response_field")
        if not instruction.strip() or not response.strip():
            continue
        out["record_id"].append(len(out["record_id"]))
        out["instruction"].append(instruction)
        out["context"].append(_field(row, spec.context_field, "context_field", required=False))
        out["response"].append(response)
        out["category"].append(_field(row, spec.category_field, "category_field", required=False))
    if not out["instruction"]:
        raise ValueError(f"{spec.path}: no usable instruction records")
    return datasets.Dataset.from_dict(out)

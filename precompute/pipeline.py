"""The offline pipeline shared by real studies (`msif precompute`) and the demo (`msif build-demo`).

Stages, each resumable and recorded in the manifest:
  corpus            pretraining documents -> corpus/documents.parquet
  finetune-data     dolly-format records  -> finetune/records.parquet
  factors-pretrained  EK-FAC of theta_pt on pretraining text (all tokens scored)
  factors-finetuned   EK-FAC of theta_ft on the records (response tokens scored)
  projection        projected pretraining-document gradients at theta_pt (sharded)
  index             faiss index over the projected gradients
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence

import datasets
import torch

from engine import (FactorArguments, LanguageModelingTask, encode_documents, encode_prompt_answer,
                    find_tracked_layers, fit_factors)

from .config import StudyConfig, format_prompt
from .study import Study, atomic_path

log = logging.getLogger(__name__)
TASK = LanguageModelingTask()
DOCUMENTS = "corpus/documents.parquet"
RECORDS = "finetune/records.parquet"
PT_FACTORS = "factors/pretrained.safetensors"
FT_FACTORS = "factors/finetuned.safetensors"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here")
    return device


def load_model(path: str, dtype: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tracked_layers(model, config: StudyConfig):
    inf = config.influence
    return find_tracked_layers(model, include=inf.include or None, exclude=inf.exclude or None)


def document_batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int) -> Iterator[dict]:
    for start in range(0, len(texts), batch_size):
        yield encode_documents(tokenizer, texts[start:start + batch_size], max_length)


def record_batches(tokenizer, config: StudyConfig, records: datasets.Dataset, batch_size: int
                   ) -> Iterator[dict]:
    """Instruction batches scored on response tokens, as in fine-tuning."""
    for start in range(0, len(records), batch_size):
        rows = records[start:start + batch_size]
        prompts = [format_prompt(config, i, c) for i, c in zip(rows["instruction"], rows["context"])]
        yield encode_prompt_answer(tokenizer, prompts, rows["response"], config.influence.max_length)


class _Loader:
    """A re-iterable view over a batch generator (fit_factors streams it once per pass)."""

    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return iter(self.make())


def run_pipeline(config: StudyConfig, out: str | Path, progress: bool = True) -> Study:
    """Run (or resume) every stage of a study; returns the finished study."""
    from .data import load_documents, load_finetune_records

    config.validate()
    study = Study(out)
    study.update_manifest(config=config.to_dict())
    study.run_stage("corpus", lambda: _write_dataset(study, DOCUMENTS, load_documents(config.pretraining)),
                    config=asdict(config.pretraining))
    study.run_stage("finetune-data",
                    lambda: _write_dataset(study, RECORDS, load_finetune_records(config.finetuning)),
                    config=asdict(config.finetuning))

    device = resolve_device(config.models.device)
    tokenizer = load_tokenizer(config.models.tokenizer or config.models.finetuned)
    inf = config.influence
    docs = datasets.Dataset.from_parquet(str(study.path(DOCUMENTS)))
    records = datasets.Dataset.from_parquet(str(study.path(RECORDS)))
    fargs = FactorArguments(strategy=inf.strategy, seed=inf.seed, label_samples=inf.label_samples,
                            progress=progress)
    factor_config = {"models": asdict(config.models), "influence": asdict(inf),
                     "template": config.template, "inputs": study.checksums(DOCUMENTS, RECORDS)}

    def fit(which: str, path: str, loader) -> list[str]:
        model_path = config.models.base if which == "pretrained" else config.models.finetuned
        model = load_model(model_path, config.models.dtype, device)
        started = time.perf_counter()
        factors = fit_factors(model, TASK, loader, tracked_layers(model, config), fargs)
        log.info("fitted %s factors in %.1fs", which, time.perf_counter() - started)
        factors.save(study.path(path))
        return [path]

    texts = docs["text"][: inf.factor_documents or None]
    study.run_stage("factors-pretrained", lambda: fit("pretrained", PT_FACTORS, _Loader(
        lambda: document_batches(tokenizer, texts, inf.max_length, inf.batch_size))),
        config=factor_config)
    study.run_stage("factors-finetuned", lambda: fit("finetuned", FT_FACTORS, _Loader(
        lambda: record_batches(tokenizer, config, records, inf.batch_size))), config=factor_config)
    return study


def _write_dataset(study: Study, relative: str, ds: datasets.Dataset) -> list[str]:
    with atomic_path(study.path(relative)) as tmp:
        ds.to_parquet(str(tmp))
    return [relative]

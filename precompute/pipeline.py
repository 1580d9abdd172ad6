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

import json
import logging
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator, Sequence

import datasets
import torch
from tqdm.auto import tqdm

import numpy as np

from engine import (FactorArguments, Factors, GradientIndex, KroneckerProjector,
                    LanguageModelingTask, ScoreArguments, capture, encode_documents,
                    encode_prompt_answer, find_tracked_layers, fit_factors, gradient_sq_norms)
from engine.influence import damping_values
from engine.projection import Whitening

from .config import StudyConfig, format_prompt
from .study import Study, atomic_path, write_json

log = logging.getLogger(__name__)
TASK = LanguageModelingTask()
DOCUMENTS = "corpus/documents.parquet"
RECORDS = "finetune/records.parquet"
PT_FACTORS = "factors/pretrained.safetensors"
FT_FACTORS = "factors/finetuned.safetensors"
PROJECTOR = "gradients/projector.safetensors"
SHARDS = "gradients/shards"
PROJECTED = "gradients/projected.npy"
SQ_NORMS = "gradients/sq_norms.npy"
INDEX = "index/gradients.faiss"
COSINE_INDEX = "index/gradients-normalized.faiss"
WHITENED = "gradients/whitened.npy"
WHITENED_INDEX = "index/gradients-whitened.faiss"
SHARD_SIZE = 1024  # documents per resumable shard


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


def model_path(study: Study, path: str) -> str:
    """Paths inside the study (the demo's models and data) are stored relative to it, so a study
    can move; anything else (a hub id, an absolute path) is returned as is."""
    local = study.path(path)
    return str(local) if path and local.exists() else path


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tracked_layers(model, config: StudyConfig):
    inf = config.influence
    return find_tracked_layers(model, include=inf.include or None, exclude=inf.exclude or None)


def factor_arguments(inf, progress: bool = True, **overrides) -> FactorArguments:
    """The fit_factors settings a study's influence config asks for (``overrides`` for variants)."""
    return FactorArguments(strategy=inf.strategy, seed=inf.seed, label_samples=inf.label_samples,
                           progress=progress, **overrides)


def document_batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int) -> Iterator[dict]:
    for start in range(0, len(texts), batch_size):
        yield encode_documents(tokenizer, texts[start:start + batch_size], max_length)


def record_batches(tokenizer, config: StudyConfig, records: datasets.Dataset, batch_size: int
                   ) -> Iterator[dict]:
    """Instruction batches scored on response tokens, as in fine-tuning."""
    for start in range(0, len(records), batch_size):
        rows = records[start:start + batch_size]
        prompts = [format_prompt(config, i, c) for i, c in zip(rows["instruction"], rows["context"])]
        answers = [r + config.response_suffix for r in rows["response"]]
        yield encode_prompt_answer(tokenizer, prompts, answers, config.influence.max_length)


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
    pt_data = replace(config.pretraining, path=model_path(study, config.pretraining.path))
    ft_data = replace(config.finetuning, path=model_path(study, config.finetuning.path))
    study.run_stage("corpus", lambda: _write_dataset(study, DOCUMENTS, load_documents(pt_data)),
                    config={**asdict(config.pretraining), "inputs": _source_stamp(pt_data.path)})
    study.run_stage("finetune-data",
                    lambda: _write_dataset(study, RECORDS, load_finetune_records(ft_data)),
                    config={**asdict(config.finetuning), "inputs": _source_stamp(ft_data.path)})

    device = resolve_device(config.models.device)
    tokenizer = load_tokenizer(model_path(study, config.models.tokenizer or config.models.finetuned))
    inf = config.influence
    docs = datasets.Dataset.from_parquet(str(study.path(DOCUMENTS)))
    records = datasets.Dataset.from_parquet(str(study.path(RECORDS)))
    fargs = factor_arguments(inf, progress)
    fit_keys = ("strategy", "label_samples", "factor_documents", "max_length", "include",
                "exclude", "seed")  # what the factors depend on; retrieval knobs are not
    factor_config = {"models": asdict(config.models),
                     "influence": {k: getattr(inf, k) for k in fit_keys},
                     "template": config.template, "response_suffix": config.response_suffix,
                     "inputs": study.checksums(DOCUMENTS, RECORDS)}

    def fit(which: str, path: str, loader) -> list[str]:
        which_path = config.models.base if which == "pretrained" else config.models.finetuned
        model = load_model(model_path(study, which_path), config.models.dtype, device)
        started = time.perf_counter()
        factors = fit_factors(model, TASK, loader, tracked_layers(model, config), fargs)
        factors.model["name_or_path"] = which_path  # as configured, not this machine's path
        log.info("fitted %s factors in %.1fs", which, time.perf_counter() - started)
        factors.save(study.path(path))
        return [path]

    texts = docs["text"][: inf.factor_documents or None]
    study.run_stage("factors-pretrained", lambda: fit("pretrained", PT_FACTORS, _Loader(
        lambda: document_batches(tokenizer, texts, inf.max_length, inf.batch_size))),
        config=factor_config)
    study.run_stage("factors-finetuned", lambda: fit("finetuned", FT_FACTORS, _Loader(
        lambda: record_batches(tokenizer, config, records, inf.batch_size))), config=factor_config)

    projection_config = {**factor_config, "shard_size": SHARD_SIZE,
                         "retrieval": {k: getattr(inf, k) for k in (
                             "projection_dim", "eigen_dim", "alpha", "damping", "damping_factor")},
                         "inputs": study.checksums(DOCUMENTS, RECORDS, PT_FACTORS)}
    study.run_stage("projection", lambda: _project(study, config, tokenizer, docs["text"], device,
                                                   progress), config=projection_config)
    study.run_stage("index", lambda: _index(study, inf.index),
                    config={"index": inf.index,
                            "inputs": study.checksums(PROJECTED, WHITENED, SQ_NORMS)})
    return study


def whitening_for(factors: Factors, config: StudyConfig) -> Whitening:
    """The pretraining-side half-inverse with the study's damping (as multi-stage scoring uses)."""
    inf = config.influence
    args = ScoreArguments(method="multi-stage", alpha=inf.alpha, damping=inf.damping,
                          damping_factor=inf.damping_factor)
    return Whitening(factors, damping_values(factors, args), keep=inf.eigen_dim)


def _project(study: Study, config: StudyConfig, tokenizer, texts: Sequence[str],
             device: torch.device, progress: bool) -> list[str]:
    """Per pretraining document at theta_pt, shard by shard: raw projected gradients
    (gradient-dot, cosine, pt-inverse-dropped), whitened top eigen-coordinates (multi-stage) and
    exact norms.

    A shard that exists is complete (atomic writes), so a rerun after a crash starts at the first
    missing shard. Shards left by a different configuration are removed first.
    """
    inf = config.influence
    model = load_model(model_path(study, config.models.base), config.models.dtype, device)
    layers = tracked_layers(model, config)
    projector = KroneckerProjector.for_layers(layers, inf.projection_dim, seed=inf.seed)
    whitening = whitening_for(Factors.load(study.path(PT_FACTORS)), config)
    shard_dir = study.path(SHARDS)
    stamp = {"projector": projector.checksum(), "inputs": study.checksums(DOCUMENTS, PT_FACTORS)}
    stamp_path = shard_dir / "stamp.json"
    if stamp_path.exists() and json.loads(stamp_path.read_text()) != stamp:
        shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    write_json(stamp_path, stamp)
    starts = range(0, len(texts), SHARD_SIZE)
    for start in tqdm(starts, desc="projection shards", disable=not progress, unit="shard"):
        path = shard_dir / f"shard-{start // SHARD_SIZE:05d}.npz"
        if path.exists():
            continue
        parts = {"vectors": [], "whitened": [], "sq_norms": []}
        for batch in document_batches(tokenizer, texts[start:start + SHARD_SIZE], inf.max_length,
                                      inf.batch_size):
            acts, grads, _ = capture_documents(model, batch, layers)
            with torch.no_grad():
                parts["vectors"].append(projector.project_captured(acts, grads).cpu().numpy())
                parts["whitened"].append(whitening.document_vectors(acts, grads).cpu().numpy())
                parts["sq_norms"].append(gradient_sq_norms(acts, grads).cpu().numpy())
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **{k: np.concatenate(v).astype(np.float32 if k != "sq_norms" else np.float64)
                               for k, v in parts.items()})
    shards = [np.load(shard_dir / f"shard-{i:05d}.npz") for i in range(len(starts))]
    for key, rel in (("vectors", PROJECTED), ("whitened", WHITENED), ("sq_norms", SQ_NORMS)):
        _save_npy(study.path(rel), np.concatenate([s[key] for s in shards]))
    projector.save(study.path(PROJECTOR), include_matrices=True,
                   metadata={"model": config.models.base})
    shutil.rmtree(shard_dir)
    return [PROJECTOR, PROJECTED, WHITENED, SQ_NORMS]


def capture_documents(model, batch, layers):
    """One forward/backward of pretraining text (separate so tests can interrupt a build)."""
    return capture(model, TASK, batch, layers)


def _index(study: Study, kind: str) -> list[str]:
    """Inner-product indexes: raw projections, raw / ||G|| (cosine), whitened (multi-stage)."""
    vectors = np.load(study.path(PROJECTED))
    norms = np.sqrt(np.load(study.path(SQ_NORMS))).clip(min=1e-30)
    kind = kind if len(vectors) >= 1000 else "flat"  # IVF needs enough points to train
    GradientIndex.build(vectors, kind=kind).save(study.path(INDEX))
    GradientIndex.build(vectors / norms[:, None], kind=kind).save(study.path(COSINE_INDEX))
    GradientIndex.build(np.load(study.path(WHITENED)), kind=kind).save(study.path(WHITENED_INDEX))
    return [INDEX, COSINE_INDEX, WHITENED_INDEX]


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def _source_stamp(path: str) -> dict:
    """Size and mtime of a local data file, so an edited input re-runs its stage."""
    p = Path(path)
    if not p.is_file():
        return {}
    stat = p.stat()
    return {"size": stat.st_size, "mtime": int(stat.st_mtime)}


def _write_dataset(study: Study, relative: str, ds: datasets.Dataset) -> list[str]:
    with atomic_path(study.path(relative)) as tmp:
        ds.to_parquet(str(tmp))
    return [relative]

"""The offline pipeline shared by real studies (`precompute`) and the demo (`build-demo`).

Stages, each resumable and recorded in the manifest (paths: ``engine.study.layout``):
  corpus              pretraining documents
  finetune-data       dolly-format records
  factors-pretrained  curvature of theta_pt on pretraining text (all tokens scored)
  factors-finetuned   curvature of theta_ft on the records (response tokens scored)
  projection          projected and whitened pretraining-document gradients at theta_pt (sharded)
  index               faiss indexes over them
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from engine import (
    Factors,
    GradientIndex,
    KroneckerProjector,
    LanguageModelingTask,
    encode_document_batches,
    fit_factors,
    iter_projected_documents,
)
from engine.models import load_causal_lm, load_tokenizer, resolve_device
from engine.storage import atomic_path, save_npy, write_json
from engine.study import Stage, Study, StudyConfig, layout

log = logging.getLogger(__name__)
TASK = LanguageModelingTask()
SHARD_SIZE = 1024  # documents per resumable shard
FIT_KEYS = ("strategy", "label_samples", "factor_documents", "max_length", "include", "exclude",
            "seed")  # the influence settings factors depend on; retrieval knobs are not among them


class Reiterable:
    """A re-iterable view over a batch generator (fit_factors streams it once per pass)."""

    def __init__(self, make: Callable[[], Iterable[dict]]):
        self.make = make

    def __iter__(self):
        return iter(self.make())


def run_pipeline(config: StudyConfig, out: str | Path, progress: bool = True) -> Study:
    """Run (or resume) every stage of a study; returns the finished study."""
    config.validate()
    study = Study(out)
    study.update_manifest(config=config.to_dict())
    _data_stages(study, config)
    device = resolve_device(config.models.device)
    tokenizer = load_tokenizer(study.resolve(config.models.tokenizer or config.models.finetuned))
    factor_config = _factor_stages(study, config, tokenizer, device, progress)
    inf = config.influence
    projection_config = {**factor_config, "shard_size": SHARD_SIZE,
                         "retrieval": {k: getattr(inf, k) for k in (
                             "projection_dim", "eigen_dim", "alpha", "damping", "damping_factor")},
                         "inputs": study.checksums(layout.DOCUMENTS, layout.RECORDS, layout.PT_FACTORS)}
    study.run_stage(Stage.PROJECTION, lambda: _project(study, config, tokenizer, device, progress),
                    config=projection_config)
    study.run_stage(Stage.INDEX, lambda: _index(study, inf.index),
                    config={"index": inf.index, "inputs": study.checksums(
                        layout.PROJECTED, layout.WHITENED, layout.SQ_NORMS)})
    return study


def _data_stages(study: Study, config: StudyConfig) -> None:
    """Pretraining documents and fine-tuning records, read through datasets into the study."""
    from .data import load_documents, load_finetune_records

    pt_data = replace(config.pretraining, path=study.resolve(config.pretraining.path))
    ft_data = replace(config.finetuning, path=study.resolve(config.finetuning.path))
    study.run_stage(Stage.CORPUS, lambda: _write_dataset(study, layout.DOCUMENTS, load_documents(pt_data)),
                    config={**asdict(config.pretraining), "inputs": _source_stamp(pt_data.path)})
    study.run_stage(Stage.FINETUNE_DATA,
                    lambda: _write_dataset(study, layout.RECORDS, load_finetune_records(ft_data)),
                    config={**asdict(config.finetuning), "inputs": _source_stamp(ft_data.path)})


def _factor_stages(study: Study, config: StudyConfig, tokenizer, device: torch.device,
                   progress: bool) -> dict:
    """Both stages' curvature factors; returns the settings they depend on (for later stages)."""
    inf = config.influence
    factor_config = {"models": asdict(config.models),
                     "influence": {k: getattr(inf, k) for k in FIT_KEYS},
                     "template": config.template, "response_suffix": config.response_suffix,
                     "inputs": study.checksums(layout.DOCUMENTS, layout.RECORDS)}
    texts = _dataset(study, layout.DOCUMENTS)["text"][: inf.factor_documents or None]
    records = _dataset(study, layout.RECORDS)

    def fit(location: str, factors: layout.Artifact, loader: Reiterable) -> list[str]:
        model = load_causal_lm(study.resolve(location), config.models.dtype, device)
        started = time.perf_counter()
        fitted = fit_factors(model, TASK, loader, inf.tracked_layers(model), inf.factor_arguments(progress))
        fitted.model["name_or_path"] = location  # as configured, not this machine's path
        log.info("fitted %s in %.1fs", factors, time.perf_counter() - started)
        fitted.save(study.path(factors))
        return [factors.path]

    study.run_stage(Stage.FACTORS_PRETRAINED, lambda: fit(config.models.base, layout.PT_FACTORS, Reiterable(
        lambda: encode_document_batches(tokenizer, texts, inf.max_length, batch_size=inf.batch_size))),
        config=factor_config)
    study.run_stage(Stage.FACTORS_FINETUNED, lambda: fit(config.models.finetuned, layout.FT_FACTORS, Reiterable(
        lambda: config.prompts.record_batches(tokenizer, records, inf.max_length, inf.batch_size))),
        config=factor_config)
    return factor_config


def _project(study: Study, config: StudyConfig, tokenizer, device: torch.device,
             progress: bool) -> list[str]:
    """Per pretraining document at theta_pt, shard by shard: raw projected gradients
    (gradient-dot, cosine, pt-inverse-dropped), whitened top eigen-coordinates (multi-stage) and
    exact norms.

    A shard that exists is complete (atomic writes), so a rerun after a crash starts at the first
    missing shard. Shards left by a different configuration are removed first.
    """
    inf = config.influence
    model = load_causal_lm(study.resolve(config.models.base), config.models.dtype, device)
    layers = inf.tracked_layers(model)
    projector = KroneckerProjector.for_layers(layers, inf.projection_dim, seed=inf.seed)
    whitening = inf.whitening(Factors.load(study.path(layout.PT_FACTORS)))
    shard_dir = _fresh_shard_dir(study, {"projector": projector.checksum(),
                                         "inputs": study.checksums(layout.DOCUMENTS, layout.PT_FACTORS)})
    texts = _dataset(study, layout.DOCUMENTS)["text"]
    starts = range(0, len(texts), SHARD_SIZE)
    for start in tqdm(starts, desc="projection shards", disable=not progress, unit="shard"):
        path = shard_dir / f"shard-{start // SHARD_SIZE:05d}.npz"
        if path.exists():
            continue
        batches = encode_document_batches(tokenizer, texts[start:start + SHARD_SIZE], inf.max_length,
                                          batch_size=inf.batch_size)
        parts = list(iter_projected_documents(model, TASK, batches, layers, projector, norms=True,
                                              whitening=whitening, progress=False))
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, vectors=np.concatenate([p.vectors for p in parts]),
                     whitened=np.concatenate([p.whitened for p in parts]),
                     sq_norms=np.concatenate([p.sq_norms for p in parts]).astype(np.float64))
    shards = [np.load(shard_dir / f"shard-{i:05d}.npz") for i in range(len(starts))]
    for key, artifact in (("vectors", layout.PROJECTED), ("whitened", layout.WHITENED),
                          ("sq_norms", layout.SQ_NORMS)):
        save_npy(study.path(artifact), np.concatenate([s[key] for s in shards]))
    projector.save(study.path(layout.PROJECTOR), include_matrices=True, metadata={"model": config.models.base})
    shutil.rmtree(shard_dir)
    return [layout.PROJECTOR.path, layout.PROJECTED.path, layout.WHITENED.path, layout.SQ_NORMS.path]


def _fresh_shard_dir(study: Study, stamp: dict) -> Path:
    """The shard directory, emptied first when its shards were made with other settings."""
    shard_dir = study.path(layout.SHARDS)
    stamp_path = shard_dir / "stamp.json"
    if stamp_path.exists() and json.loads(stamp_path.read_text()) != stamp:
        shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    write_json(stamp_path, stamp)
    return shard_dir


def _index(study: Study, kind: str) -> list[str]:
    """Inner-product indexes: raw projections, raw / ||G|| (cosine), whitened (multi-stage)."""
    vectors = np.load(study.path(layout.PROJECTED))
    norms = np.sqrt(np.load(study.path(layout.SQ_NORMS))).clip(min=1e-30)
    kind = kind if len(vectors) >= 1000 else "flat"  # IVF needs enough points to train
    built = ((layout.RAW_INDEX, vectors), (layout.COSINE_INDEX, vectors / norms[:, None]),
             (layout.WHITENED_INDEX, np.load(study.path(layout.WHITENED))))
    for artifact, rows in built:
        GradientIndex.build(rows, kind=kind).save(study.path(artifact))
    return [artifact.path for artifact, _ in built]


def _dataset(study: Study, artifact: layout.Artifact) -> datasets.Dataset:
    return datasets.Dataset.from_parquet(str(study.path(artifact)))


def _source_stamp(path: str) -> dict:
    """Size and mtime of a local data file, so an edited input re-runs its stage."""
    p = Path(path)
    if not p.is_file():
        return {}
    stat = p.stat()
    return {"size": stat.st_size, "mtime": int(stat.st_mtime)}


def _write_dataset(study: Study, artifact: layout.Artifact, ds: datasets.Dataset) -> list[str]:
    with atomic_path(study.path(artifact)) as tmp:
        ds.to_parquet(str(tmp))
    return [artifact.path]


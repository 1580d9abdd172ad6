"""Opening a finished study into one typed bundle: models, tokenizer, tracked layers, factors,
projector, indexes, documents and records, each checked against the others."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..factors import Factors
from ..methods import FACTOR_PRECISIONS
from ..models import load_causal_lm, load_tokenizer, resolve_device
from ..projection import KroneckerProjector, Whitening
from ..text import encode_document_batches
from ..tracking import TrackedLayer
from . import layout
from .config import PromptTemplate, StudyConfig
from .index import StudyIndex
from .manifest import Study, StudyError, role_files
from .vectors import DocumentVectors


@dataclass
class StageModel:
    """One training stage's model as influence sees it: weights, tracked layers, curvature."""

    location: str  # as configured (a hub id or a path relative to the study)
    model: nn.Module
    layers: list[TrackedLayer]
    factors: Factors


@dataclass
class OpenedStudy:
    """Everything a query needs, loaded once."""

    directory: Study
    manifest: dict[str, Any]
    config: StudyConfig
    device: torch.device
    tokenizer: Any
    pretrained: StageModel  # theta_pt; pretraining documents' gradients live here
    finetuned: StageModel  # theta_ft; queries' gradients live here
    projector: KroneckerProjector
    whitening: Whitening
    index: StudyIndex  # search over the document vectors (memory-mapped)
    documents: Any  # datasets.Dataset: doc_id, title, text
    records: Any  # datasets.Dataset: record_id, instruction, context, response, category

    @property
    def root(self) -> Path:
        return self.directory.root

    def path(self, item: str | layout.Artifact) -> Path:
        return self.directory.path(item)

    @property
    def prompts(self) -> PromptTemplate:
        return self.config.prompts

    def document_batches(self, doc_ids: Sequence[int]) -> list[dict]:
        """Documents in order, batched by a token budget (batch_size x max_length tokens)."""
        texts = self.documents.select(list(doc_ids))["text"] if len(doc_ids) else []
        inf = self.config.influence
        return list(encode_document_batches(self.tokenizer, texts, inf.max_length,
                                            inf.batch_size * inf.max_length))

    def record_batches(self, record_ids: Sequence[int]) -> list[dict]:
        """Fine-tuning records in order, scored on their responses as in training."""
        rows = self.records.select(list(record_ids))
        inf = self.config.influence
        return list(self.prompts.record_batches(self.tokenizer, rows, inf.max_length, inf.batch_size))

    @property
    def vectors(self) -> DocumentVectors:
        """The pretraining documents' stored vectors (memory-mapped shards, opened once)."""
        return self.index.vectors

    def sq_norms(self) -> np.ndarray:
        """Exact squared gradient norms of every document at theta_pt, (documents,) float64."""
        return self.vectors.sq_norms()


def open_study(root: str | os.PathLike, device: str = "auto", progress: bool = False,
               factor_precision: str | None = None) -> OpenedStudy:
    """Verify a finished study (every file's sha256, and every file its models are loaded from)
    and load it; ``device`` "auto" takes the study's configured one; ``factor_precision`` (float32,
    bfloat16, float16) holds both factor sets in that precision (default: the study's
    ``influence.factor_precision``).

    Raises :class:`StudyError` when the study is missing or incomplete and
    :class:`FactorMismatchError` when its factors or projector do not fit its models.
    """
    import datasets

    study = Study(root)
    manifest = study.verify(layout.READER_STAGES, progress=progress)
    try:
        config = StudyConfig.from_dict(manifest.get("config") or {})
    except ValueError as err:
        raise StudyError(f"{study.manifest_path}: the study's config is invalid ({err}); "
                         f"run `{study.rebuild_command(manifest)}` to rebuild it") from None
    _check_identity(study, manifest, config)
    device = resolve_device(device if device != "auto" else config.models.device)
    m = config.models
    dtype = held_precision(factor_precision or config.influence.factor_precision)
    pretrained = _stage_model(study, config, m.base, layout.PT_FACTORS, device, dtype)
    finetuned = _stage_model(study, config, m.finetuned, layout.FT_FACTORS, device, dtype)
    projector = KroneckerProjector.load(study.path(layout.PROJECTOR))
    projector.check_compatible(pretrained.layers)
    return OpenedStudy(
        study, manifest, config, device, load_tokenizer(study.resolve(m.tokenizer or m.finetuned)),
        # the kept eigen-coordinates are picked from the factors as stored, as the documents' were (16-bit
        # eigenvalues would tie and reorder them)
        pretrained, finetuned, projector, config.influence.whitening(pretrained.factors.as_stored()),
        StudyIndex.of(study),
        datasets.Dataset.from_parquet(str(study.path(layout.DOCUMENTS))),
        datasets.Dataset.from_parquet(str(study.path(layout.RECORDS))))


def _check_identity(study: Study, manifest: dict, config: StudyConfig) -> None:
    """The models and tokenizer are the files the factors were fit with, byte for byte."""
    locations, recorded = config.models.locations(), study.recorded_identity(manifest)
    unchecked = study.unchecked_models(manifest)
    if unchecked:  # an older msif recorded null checksums for a study built under a relative path
        raise StudyError(f"the study records no checksum of {role_files(unchecked[0])}, so it cannot check "
                         f"they are the ones its factors were fit with; run `{study.rebuild_command(manifest)}` "
                         "to record them (it reruns the stages that depend on the models: factors, vectors)")
    found = study.model_identity(locations)
    for role, files in recorded.items():
        changed = sorted(set(files.items()) ^ set(found.get(role, {}).items()))
        if changed:
            where = study.resolve(locations[role])
            raise StudyError(f"{role_files(role, plural=False)} {changed[0][0]} at {where} is not "
                             f"the one the study was built with (missing, added or changed); rebuild the study "
                             f"(`{study.rebuild_command(manifest)}`) or point models.{role} at the original")


def held_precision(precision: str) -> torch.dtype | None:
    """The dtype factors are held in for a ``factor_precision`` (None: as stored, float32)."""
    if precision not in FACTOR_PRECISIONS:
        raise ValueError(f"factor precision must be one of {', '.join(FACTOR_PRECISIONS)}, got {precision!r}")
    return None if precision == "float32" else getattr(torch, precision)


def _stage_model(study: Study, config: StudyConfig, location: str, factors: layout.Artifact,
                 device: torch.device, dtype: torch.dtype | None = None) -> StageModel:
    model = load_causal_lm(study.resolve(location), config.models.dtype, device)
    layers = config.influence.tracked_layers(model)
    fitted = Factors.load(study.path(factors), device=device, dtype=dtype)  # each layer read when first used
    fitted.check_compatible(model, layers)
    return StageModel(location, model, layers, fitted)

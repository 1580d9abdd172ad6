"""The offline pipeline shared by real studies (`precompute`) and the demo (`build-demo`).

Stages, each resumable and recorded in the manifest (paths: ``engine.study.layout``):
  corpus              pretraining documents
  finetune-data       dolly-format records
  factors-pretrained  curvature of theta_pt on pretraining text (all tokens scored)
  factors-finetuned   curvature of theta_ft on the records (response tokens scored)
  projection          projected and whitened pretraining-document gradients at theta_pt (shards)
  index               the search index over them (exhaustive, or staged for large corpora)

Under torchrun every rank runs this; rank 0 alone writes the manifest, the data stages, the
factor directories and the indexes, while factor passes split batches across ranks and the
projection stage splits shards (shard ``s`` belongs to rank ``s % world``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from functools import cached_property
from pathlib import Path

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from engine import (
    Factors,
    KroneckerProjector,
    LanguageModelingTask,
    ProjectedDocuments,
    encode_document_batches,
    encode_documents,
    fit_factors,
    iter_projected_documents,
    precondition,
    sequence_gradients,
)
from engine import distributed as dist
from engine.methods import BASIS_QUERIES, PROBES
from engine.models import load_causal_lm, load_tokenizer, resolve_device
from engine.query import index_vectors
from engine.storage import atomic_path, check_storable, write_json, write_text
from engine.study import Stage, StageRun, Study, StudyConfig, build_index, held_precision, layout, run_stages
from engine.study.vectors import shard_done, write_shard

log = logging.getLogger(__name__)
TASK = LanguageModelingTask()
SHARD_SIZE = 1024  # documents per resumable shard
FIT_KEYS = ("strategy", "label_samples", "factor_documents", "max_length", "include", "exclude", "seed",
            "accumulation", "keep_covariances")  # what factors depend on; retrieval knobs are not among them


class Batches(Sequence):
    """Fixed-size batches, encoded when indexed: a rank of a distributed fit encodes only its own
    batches, and fit_factors can stream them once per pass."""

    def __init__(self, make: Callable[[int], dict], count: int):
        self.make, self.count = make, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.make(index)


def document_batches(tokenizer, texts, max_length: int, batch_size: int) -> Batches:
    def make(i: int) -> dict:
        return encode_documents(tokenizer, texts[i * batch_size:(i + 1) * batch_size], max_length)
    return Batches(make, math.ceil(len(texts) / batch_size))


def record_batches(tokenizer, config: StudyConfig, records, batch_size: int) -> Batches:
    def make(i: int) -> dict:
        rows = records.select(range(i * batch_size, min((i + 1) * batch_size, len(records))))
        return next(config.prompts.record_batches(tokenizer, rows, config.influence.max_length, batch_size))
    return Batches(make, math.ceil(len(records) / batch_size))


class Pipeline:
    """The pipeline's stages for one study, as a table: corpus, fine-tuning data, both factor sets,
    projection, index. Each stage's settings are what its files depend on, so that a changed setting
    reruns it and the stages after it that depend on its files. ``config`` may be a function (the
    demo's depends on its fine-tuning stage); once known it is recorded in the manifest, where
    readers open the study with it."""

    def __init__(self, study: Study, config: StudyConfig | Callable[[], StudyConfig], progress: bool = True,
                 command: list[str] | None = None):
        self.study, self._config, self._progress, self.command = study, config, progress, command
        self._search: dict = {}

    @cached_property
    def config(self) -> StudyConfig:
        config = self._config() if callable(self._config) else self._config
        config.validate()
        if dist.is_main():  # which study this is, recorded first: a resumed build is the same study
            self.study.update_manifest(config=config.to_dict(), **({"command": self.command} if self.command else {}))
        return config

    @cached_property
    def device(self) -> torch.device:
        device = resolve_device(self.config.models.device)
        dist.init(device)
        return dist.local_device(device)

    @property
    def progress(self) -> bool:
        return self._progress and dist.is_main()

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.study.resolve(self.config.models.tokenizer or self.config.models.finetuned))

    def stages(self) -> list[StageRun]:
        return [
            StageRun(Stage.CORPUS, self._corpus_settings, lambda: self._write(layout.DOCUMENTS, self._documents())),
            StageRun(Stage.FINETUNE_DATA, self._records_settings, lambda: self._write(layout.RECORDS, self._records())),
            StageRun(Stage.FACTORS_PRETRAINED, lambda: self.factor_settings, lambda: self._fit(layout.PT_FACTORS),
                     every_rank=True),
            StageRun(Stage.FACTORS_FINETUNED, lambda: self.factor_settings, lambda: self._fit(layout.FT_FACTORS),
                     every_rank=True),
            StageRun(Stage.PROJECTION, self._projection_settings,
                     lambda: _project(self.study, self.config, self.tokenizer, self.device, self.progress),
                     every_rank=True, info=lambda: _vector_record(self.study, self.config.influence.vector_dtype)),
            StageRun(Stage.INDEX, self._index_settings,
                     lambda: _index(self.study, self.config, self.device, self._search, self.progress),
                     info=lambda: {"search": self._search.pop("search")}),
        ]

    # -- the data stages: pretraining documents and fine-tuning records, read through datasets ---------
    def _sources(self) -> tuple:
        pt_data = replace(self.config.pretraining, path=self.study.resolve(self.config.pretraining.path),
                          more=[self.study.resolve(p) for p in self.config.pretraining.more])
        return pt_data, replace(self.config.finetuning, path=self.study.resolve(self.config.finetuning.path))

    def _corpus_settings(self) -> dict:
        pt_data = self._sources()[0]
        return {**asdict(self.config.pretraining),
                "inputs": [_source_stamp(p) for p in [pt_data.path, *pt_data.more]] if pt_data.more
                else _source_stamp(pt_data.path)}

    def _records_settings(self) -> dict:
        return {**asdict(self.config.finetuning), "inputs": _source_stamp(self._sources()[1].path)}

    def _documents(self) -> datasets.Dataset:
        from .data import load_documents

        return load_documents(self._sources()[0])

    def _records(self) -> datasets.Dataset:
        from .data import load_finetune_records

        return load_finetune_records(self._sources()[1])

    def _write(self, artifact: layout.Artifact, ds: datasets.Dataset) -> list[str]:
        with atomic_path(self.study.path(artifact)) as tmp:
            ds.to_parquet(str(tmp))
        return [artifact.path]

    # -- both stages' curvature factors -------------------------------------------------------------
    @cached_property
    def factor_texts(self) -> list[str]:
        """The pretraining documents H_pt is fit on: not documents added after them (a haystack)."""
        documents = _dataset(self.study, layout.DOCUMENTS)
        return documents.select(range(min(len(documents), self.config.influence.factor_documents
                                          or len(documents))))["text"]

    @cached_property
    def factor_settings(self) -> dict:
        """What both factor sets depend on (and, through them, every later stage)."""
        config, inf = self.config, self.config.influence
        return {"models": asdict(config.models), "identity": self.study.model_identity(config.models.locations()),
                "influence": {**{k: getattr(inf, k) for k in FIT_KEYS}, "factor_documents": len(self.factor_texts)},
                "template": config.template, "response_suffix": config.response_suffix,
                "inputs": {"documents": texts_digest(self.factor_texts), **self.study.checksums(layout.RECORDS)}}

    def _fit(self, factors: layout.Artifact) -> list[str]:
        config, inf, study = self.config, self.config.influence, self.study
        if factors == layout.PT_FACTORS:
            location = config.models.base
            loader = document_batches(self.tokenizer, self.factor_texts, inf.max_length, inf.batch_size)
        else:
            location = config.models.finetuned
            loader = record_batches(self.tokenizer, config, _dataset(study, layout.RECORDS), inf.batch_size)
        model = load_causal_lm(study.resolve(location), config.models.dtype, self.device)
        model.config._name_or_path = location  # the factors name the model as configured, not by this machine's path
        started = time.perf_counter()
        fitted = fit_factors(model, TASK, loader, inf.tracked_layers(model), inf.factor_arguments(self.progress),
                             out=study.path(factors))
        log.info("fitted %s (%d layers) in %.1fs", factors, len(fitted.layers), time.perf_counter() - started)
        return study.files_under(factors) if dist.is_main() else []

    # -- the documents' vectors and their index -----------------------------------------------------
    def _projection_settings(self) -> dict:
        inf = self.config.influence
        return {**self.factor_settings, "shard_size": SHARD_SIZE,
                "retrieval": {k: getattr(inf, k) for k in (
                    "projection_dim", "eigen_dim", "alpha", "damping", "damping_factor", "vector_dtype")},
                "inputs": self.study.checksums(layout.DOCUMENTS, layout.RECORDS, layout.PT_FACTORS)}

    def _index_settings(self) -> dict:
        return {"index": asdict(self.config.influence.index_settings()), "inputs": self.study.checksums(layout.SHARDS),
                "outputs": [layout.INDEX_NORMS.path]}


def run_pipeline(config: StudyConfig, out: str | Path, progress: bool = True, command: list[str] | None = None
                 ) -> Study:
    """Run (or resume) every stage of a study; returns the finished study. ``command``: the command
    line that rebuilds it, recorded for repair messages."""
    study = Study(out)
    run_stages(study, Pipeline(study, config, progress, command).stages())
    return study


def _project(study: Study, config: StudyConfig, tokenizer, device: torch.device, progress: bool) -> list[str]:
    """Per pretraining document at theta_pt, shard by shard: raw projected gradients
    (gradient-dot, cosine, pt-inverse-dropped), whitened top eigen-coordinates (multi-stage) and
    exact norms. This rank's shards only; returns every shard's files.

    A shard whose files exist is complete (atomic writes, norms last), so a rerun after a crash
    starts at the first missing shard. Shards left by a different configuration, and shards whose
    documents' texts changed (their ``texts.sha256``), are removed first: a grown corpus projects
    only its new shards.
    """
    inf = config.influence
    model = load_causal_lm(study.resolve(config.models.base), config.models.dtype, device)
    layers = inf.tracked_layers(model)
    projector = KroneckerProjector.for_layers(layers, inf.projection_dim, seed=inf.seed)
    whitening = inf.whitening(Factors.load(study.path(layout.PT_FACTORS), device=device, cache=False))
    for dim in (whitening.dim, projector.dim):  # before any document is projected
        check_storable(dim, inf.vector_dtype)
    _fresh_shards(study, {"projector": projector.checksum(), "vector_dtype": inf.vector_dtype,
                          "inputs": study.checksums(layout.PT_FACTORS)})
    texts = _dataset(study, layout.DOCUMENTS)["text"]
    shards = math.ceil(len(texts) / SHARD_SIZE)
    digests = [texts_digest(texts[s * SHARD_SIZE:(s + 1) * SHARD_SIZE]) for s in range(shards)]
    if dist.is_main():
        _drop_stale_shards(study, digests)
    dist.barrier()
    mine = [s for s in range(shards) if dist.owner(s) == dist.rank() and not shard_done(study, s)]
    todo = sum(len(texts[s * SHARD_SIZE:(s + 1) * SHARD_SIZE]) for s in mine)
    with tqdm(total=todo, desc="projecting documents", disable=not progress, unit="doc", unit_scale=True) as bar:
        for s in mine:
            chunk = texts[s * SHARD_SIZE:(s + 1) * SHARD_SIZE]
            batches = encode_document_batches(tokenizer, chunk, inf.max_length, batch_size=inf.batch_size)
            shard = ProjectedDocuments.concatenate(list(iter_projected_documents(
                model, TASK, batches, layers, projector, norms=True, whitening=whitening, progress=False)))
            write_text(study.path(layout.shard_digest_file(s)), digests[s] + "\n")
            write_shard(study, s, shard.vectors, shard.whitened, shard.sq_norms, inf.vector_dtype)
            bar.update(len(chunk))
    if dist.is_main():
        projector.save(study.path(layout.PROJECTOR), include_matrices=True, metadata={"model": config.models.base})
    return [layout.PROJECTOR.path, f"{layout.SHARDS.path}/stamp.json",
            *(f for s in range(shards) for f in (layout.shard_digest_file(s),
                                                  *(layout.shard_file(s, kind) for kind in layout.SHARD_KINDS)))]


def _vector_record(study: Study, dtype: str) -> dict:
    """What readers of the shards need (``DocumentVectors.of``), recorded with the projection stage."""
    documents = len(_dataset(study, layout.DOCUMENTS))
    return {"vectors": {"documents": documents, "shards": math.ceil(documents / SHARD_SIZE),
                        "shard_size": SHARD_SIZE, "dtype": dtype}}


def _fresh_shards(study: Study, stamp: dict) -> None:
    """The shard directory, emptied first when its shards were made with other settings."""
    if dist.is_main():
        shard_dir = study.path(layout.SHARDS)
        stamp_path = shard_dir / "stamp.json"
        if stamp_path.exists() and json.loads(stamp_path.read_text()) != stamp:
            shutil.rmtree(shard_dir)
        shard_dir.mkdir(parents=True, exist_ok=True)
        write_json(stamp_path, stamp)
    dist.barrier()


def _index(study: Study, config: StudyConfig, device: torch.device, out: dict, progress: bool) -> list[str]:
    """The search index over the shards (``engine.study.index``). A staged (ivf) index fits its coarse
    basis on the query vectors of fine-tuning records (prompts in the study's template, as the explorer
    makes them) and measures its recall against a full scan on ``PROBE_RECORDS`` others."""
    settings = config.influence.index_settings()
    if settings.resolved(len(_dataset(study, layout.DOCUMENTS))) == "flat":  # a flat index is the scan itself
        written, out["search"] = build_index(study, settings, progress=progress)
        return written
    records = len(_dataset(study, layout.RECORDS))
    probes = np.arange(min(PROBE_RECORDS, records // 2))
    rest = np.arange(len(probes), records)
    fit = rest[np.unique(np.linspace(0, len(rest) - 1, min(settings.queries, len(rest))).round().astype(int))]
    vectors = _record_queries(study, config, device, np.concatenate([probes, fit]), BASIS_QUERIES)
    queries = {kind: np.concatenate([rows[len(probes):] for rows in by_method.values()])
               for kind, by_method in vectors.items()}
    probe_vectors = {kind: vectors[kind][name][:len(probes)] for kind, name in PROBES.items()} if len(probes) else None
    written, out["search"] = build_index(study, settings, queries, probe_vectors, progress)
    return written


PROBE_RECORDS = 16  # fine-tuning records held out of the basis fit, to measure the index's recall


def _record_queries(study: Study, config: StudyConfig, device: torch.device, ids: np.ndarray,
                    methods: dict[str, tuple[str, ...]]) -> dict[str, dict[str, np.ndarray]]:
    """Index-space query vectors (kind -> method -> (n, D)) of fine-tuning records ``ids``, made a
    batch at a time (a preconditioned query is as large as the model; its index vector is small)."""
    inf = config.influence
    records = _dataset(study, layout.RECORDS).select(ids.tolist())
    ft_model = load_causal_lm(study.resolve(config.models.finetuned), config.models.dtype, device)
    held = held_precision(inf.factor_precision)  # as the explorer holds them
    pt_factors = Factors.load(study.path(layout.PT_FACTORS), device=device, dtype=held)
    ft_factors = Factors.load(study.path(layout.FT_FACTORS), device=device, dtype=held)
    tokenizer = load_tokenizer(study.resolve(config.models.tokenizer or config.models.finetuned))
    layers = inf.tracked_layers(ft_model)
    # the kept eigen-coordinates are picked from the stored factors, as the documents' were
    whitening, projector = inf.whitening(pt_factors.as_stored()), KroneckerProjector.load(study.path(layout.PROJECTOR))
    parts = {kind: {name: [] for name in names} for kind, names in methods.items()}
    for batch in config.prompts.record_batches(tokenizer, records, inf.max_length, inf.batch_size):
        grads = sequence_gradients(ft_model, TASK, batch, layers)
        for kind, names in methods.items():
            for name in names:
                query = precondition(grads, inf.score_arguments(name), pt_factors, ft_factors)
                parts[kind][name].append(index_vectors(kind, query, whitening, projector).cpu().numpy())
    return {kind: {name: np.concatenate(rows) for name, rows in by_method.items()} for kind, by_method in parts.items()}


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 over texts (length-prefixed, so boundaries count)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def _drop_stale_shards(study: Study, digests: list[str]) -> None:
    """Remove shards whose texts changed, shards past the end of a corpus that shrank, and shards
    with a file that no longer matches its recorded checksum (damaged: recomputed)."""
    shard_dir = study.path(layout.SHARDS)
    manifest = study.manifest()
    recorded = [f for f in manifest["files"] if f.startswith(layout.SHARDS.path + "/shard-")]
    damaged = {f.split("/")[2] for f in study.damaged(manifest, recorded)}
    for path in sorted(shard_dir.glob("shard-*")):
        s = int(path.name.split("-")[1])
        digest_file = study.path(layout.shard_digest_file(s))
        stored = digest_file.read_text().strip() if digest_file.exists() else ""
        if s >= len(digests) or stored != digests[s] or path.name in damaged:
            shutil.rmtree(path)


def _dataset(study: Study, artifact: layout.Artifact) -> datasets.Dataset:
    return datasets.Dataset.from_parquet(str(study.path(artifact)))


def _source_stamp(path: str) -> dict:
    """Size and mtime of a local data file, so an edited input re-runs its stage."""
    p = Path(path)
    if not p.is_file():
        return {}
    stat = p.stat()
    return {"size": stat.st_size, "mtime": int(stat.st_mtime)}

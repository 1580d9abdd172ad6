"""The study directory: one self-describing folder per (base model, fine-tuned model, corpus).

Layout (paths relative to the study root)::

    manifest.json              versions, config, model identities, stages done, sha256 per file
    world/facts.jsonl          demo only: facts with questions, answers and source documents
    corpus/documents.parquet   pretraining documents (doc_id, title, text, ...)
    finetune/records.parquet   fine-tuning records in dolly-15k format
    models/pretrained/         save_pretrained of theta_pt (demo) - real studies reference ids
    models/finetuned/          save_pretrained of theta_ft (demo)
    tokenizer/                 the fine-tuned model's tokenizer (demo)
    factors/{pretrained,finetuned}.safetensors
    gradients/projector.safetensors, gradients/shards/*.npy, gradients/projected.npy
    index/gradients.faiss

Every file is written atomically (temporary name, then rename), and a stage is recorded in the
manifest only after all its files exist, so an interrupted build resumes at the first stage (or
shard) that did not finish.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from engine.storage import atomic_path  # noqa: F401 - re-exported for the pipeline

MANIFEST = "manifest.json"
FORMAT = "msif-study"
FORMAT_VERSION = 1


class StudyError(RuntimeError):
    """A study directory is missing, incomplete, stale or from another model."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Like :func:`atomic_path` for a directory (e.g. a save_pretrained target)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            _remove_tree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            _remove_tree(tmp)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def software_versions() -> dict[str, str]:
    import torch
    import transformers

    import engine

    return {"msif": engine.__version__, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


class Study:
    """A study directory and its manifest."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, relative: str) -> Path:
        return self.root / relative

    # -- manifest -------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"format": FORMAT, "format_version": FORMAT_VERSION, "stages": {}, "files": {}}
        data = json.loads(self.manifest_path.read_text())
        if data.get("format") != FORMAT:
            raise StudyError(f"{self.manifest_path} is not an MSIF study manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise StudyError(f"{self.root} has study format {data.get('format_version')}, this "
                             f"msif reads {FORMAT_VERSION}; rebuild the study")
        return data

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        data = self.manifest()
        data.update(fields)
        data["software"] = software_versions()
        data["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(self.manifest_path, data)
        return data

    # -- stages ---------------------------------------------------------------------------------
    def is_done(self, stage: str, config: Any = None) -> bool:
        """A stage is done when recorded with the same config and all its files are intact."""
        record = self.manifest()["stages"].get(stage)
        if record is None or record.get("config") != _jsonable(config):
            return False
        files = self.manifest()["files"]
        return all(self.path(f).exists() and files.get(f, {}).get("size") == self.path(f).stat().st_size
                   for f in record["files"])

    def run_stage(self, stage: str, produce: Callable[[], list[str]], config: Any = None,
                  info: Callable[[], dict] | None = None) -> bool:
        """Run ``produce`` unless ``stage`` is already done; it returns the files it wrote.

        Returns True when the stage ran, False when it was skipped (resumed).
        """
        if self.is_done(stage, config):
            return False
        written = produce()
        data = self.manifest()
        for rel in written:
            p = self.path(rel)
            if not p.exists():
                raise StudyError(f"stage {stage} said it wrote {rel}, which does not exist")
            data["files"][rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        data["stages"][stage] = {"config": _jsonable(config), "files": list(written),
                                 "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 **(info() if info else {})}
        self.update_manifest(stages=data["stages"], files=data["files"])
        return True

    def checksums(self, *relative: str) -> dict[str, str]:
        """Recorded sha256 of study files: put these in a stage's config to make it depend on them."""
        files = self.manifest()["files"]
        return {rel: files.get(rel, {}).get("sha256", "") for rel in relative}

    def files_under(self, relative_dir: str) -> list[str]:
        """Every file below a directory of the study, as study-relative paths."""
        base = self.path(relative_dir)
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

    def verify(self, required: list[str], checksums: bool = False) -> dict[str, Any]:
        """The manifest, once the study exists, has the ``required`` stages and its files are intact.

        Sizes are always compared; ``checksums=True`` also recomputes every sha256 (slow for big
        studies). Raises :class:`StudyError` with what to do otherwise.
        """
        if not self.root.is_dir():
            raise StudyError(f"no study at {self.root}: build one with `msif build-demo --out "
                             f"{self.root}` or `msif precompute`")
        if not self.manifest_path.exists():
            raise StudyError(f"{self.root} has no {MANIFEST}: the build did not finish; "
                             "run the same build command again to resume it")
        data = self.manifest()
        missing = [s for s in required if s not in data["stages"]]
        if missing:
            raise StudyError(f"{self.root} is incomplete (missing stages: {', '.join(missing)}); "
                             "run the same build command again to resume it")
        for rel, rec in data["files"].items():
            p = self.path(rel)
            if not p.exists():
                raise StudyError(f"{rel} is listed in the manifest but missing from {self.root}")
            if p.stat().st_size != rec["size"] or (checksums and sha256_file(p) != rec["sha256"]):
                raise StudyError(f"{rel} changed after the study was built (checksum mismatch); "
                                 "rebuild the study")
        return data


def _jsonable(value: Any) -> Any:
    """Configs are compared through their JSON form (dataclasses become dicts)."""
    from dataclasses import asdict, is_dataclass

    if is_dataclass(value):
        value = asdict(value)
    return json.loads(json.dumps(value, sort_keys=True, default=str))

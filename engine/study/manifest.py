"""A study directory and its manifest: stages run once and recorded, files checksummed, verified.

Every file is written atomically (temporary name, then rename), and a stage is recorded in the
manifest only after all its files exist, so an interrupted build resumes at the first stage (or
shard) that did not finish. A stage is redone when its settings (or the inputs they name by
checksum) change.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Iterable, Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..storage import write_json
from .layout import FORMAT, FORMAT_VERSION, MANIFEST, READER_STAGES, Artifact


class StudyError(RuntimeError):
    """A study directory is missing, incomplete, stale or from another model."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def jsonable(value: Any) -> Any:
    """``value`` as JSON would give it back (dataclasses become dicts): how settings are stored
    in the manifest and compared with it."""
    if is_dataclass(value):
        value = asdict(value)
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def software_versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {"msif": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Study:
    """A study directory and its manifest."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, item: str | Artifact) -> Path:
        return self.root / str(item)

    def resolve(self, location: str) -> str:
        """A model or data location as configured: paths inside the study (the demo's models and
        data) are stored relative to it so that a study can move; anything else (a hub id, an
        absolute path) is returned as is."""
        local = self.path(location)
        return str(local) if location and local.exists() else location

    # -- manifest -------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path(MANIFEST)

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"format": FORMAT, "format_version": FORMAT_VERSION, "stages": {}, "files": {}}
        data = json.loads(self.manifest_path.read_text())
        if data.get("format") != FORMAT:
            raise StudyError(f"{self.manifest_path} is not an MSIF study manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise StudyError(f"{self.root} was built by another msif (study format {data.get('format_version')}; "
                             f"this one reads {FORMAT_VERSION}): rebuild the study in a new directory, or remove "
                             f"this one and run its build command again (`msif build-demo --out {self.root}` "
                             "for the demo)")
        return data

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        data = self.manifest()
        data.update(fields)
        data["software"] = software_versions()
        data["updated"] = _now()
        write_json(self.manifest_path, data)
        return data

    # -- stages ---------------------------------------------------------------------------------
    def is_done(self, stage: str, config: Any = None) -> bool:
        """A stage is done when recorded with the same config and all its files are intact."""
        manifest = self.manifest()
        record = manifest["stages"].get(stage)
        if record is None or record.get("config") != jsonable(config):
            return False
        files = manifest["files"]
        return all(self.path(f).exists() and files.get(f, {}).get("size") == self.path(f).stat().st_size
                   for f in record["files"])

    def record_stage(self, stage: str, written: Iterable[str | Artifact], config: Any = None,
                     info: dict | None = None) -> None:
        """Record a finished stage: its settings, its files with their checksums, ``info``."""
        written = [str(f) for f in written]
        data = self.manifest()
        before = data["stages"].get(stage, {}).get("files", [])
        for rel in set(before) - set(written):  # e.g. shards of a corpus that shrank
            data["files"].pop(rel, None)
        for rel in written:
            p = self.path(rel)
            if not p.exists():
                raise StudyError(f"stage {stage} said it wrote {rel}, which does not exist")
            data["files"][rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        data["stages"][stage] = {"config": jsonable(config), "files": written, "finished": _now(), **(info or {})}
        self.update_manifest(stages=data["stages"], files=data["files"])

    def checksums(self, *items: str | Artifact) -> dict[str, str]:
        """Recorded sha256 of study files, or of every file below a directory (one digest over
        them): put these in a stage's config to make it depend on them."""
        files = self.manifest()["files"]
        out = {}
        for item in map(str, items):
            if item in files:
                out[item] = files[item]["sha256"]
                continue
            below = sorted((rel, rec["sha256"]) for rel, rec in files.items() if rel.startswith(item + "/"))
            out[item] = hashlib.sha256(json.dumps(below).encode()).hexdigest() if below else ""
        return out

    def files_under(self, directory: str | Artifact) -> list[str]:
        """Every file below a directory of the study, as study-relative paths."""
        return sorted(str(p.relative_to(self.root)) for p in self.path(directory).rglob("*") if p.is_file())

    def verify(self, required: Sequence[str] = READER_STAGES, checksums: bool = False) -> dict[str, Any]:
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

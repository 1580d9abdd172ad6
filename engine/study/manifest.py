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
import shlex
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..console import with_option
from ..storage import write_json
from .integrity import CACHE, DigestCache, sha256_file
from .layout import FORMAT, FORMAT_VERSION, INDEX_NORMS, MANIFEST, READER_STAGES, Artifact, Stage
from .lock import LOCK

__all__ = ["Study", "StudyError", "jsonable", "sha256_file", "software_versions"]


class StudyError(RuntimeError):
    """A study directory is missing, incomplete, stale or from another model."""


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


MODEL_ROLES = ("base", "finetuned", "tokenizer")  # the parts whose files are a study's models' identity


def role_files(role: str, plural: bool = True) -> str:
    """A role's files in words: "the base model's files", "the tokenizer's file"."""
    files = "files" if plural else "file"
    return f"the {role}'s {files}" if role == "tokenizer" else f"the {role} model's {files}"
BOOKKEEPING = (CACHE, LOCK)  # files in a study directory that are not part of the study


def _difference(key: str, found: Any, expected: Any) -> str:
    """The first setting where a study differs from the one asked for, in words."""
    if found is None:
        return f"it has no {key!r} record: another command built it"
    while isinstance(found, dict) and isinstance(expected, dict):
        name = next((n for n in sorted(set(found) | set(expected)) if found.get(n) != expected.get(n)), None)
        if name is None:
            break
        key, found, expected = f"{key}.{name}", found.get(name), expected.get(name)
    return f"{key} is {json.dumps(found)[:60]} there, {json.dumps(expected)[:60]} here"


class Study:
    """A study directory and its manifest."""

    def __init__(self, root: str | os.PathLike):
        # One spelling for every way of naming the directory (relative, absolute, through a symlink,
        # from any working directory): what is recorded and verified must not depend on it.
        self.root = Path(root).expanduser().resolve()

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
        try:
            data = json.loads(self.manifest_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise StudyError(f"{self.manifest_path} cannot be read ({type(err).__name__}); the study's record "
                             "is lost: build it again in a new directory") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StudyError(f"{self.manifest_path} is not an MSIF study manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise StudyError(f"{self.root} was built by another msif (study format {data.get('format_version')}; "
                             f"this one reads {FORMAT_VERSION}): rebuild the study in a new directory, or remove "
                             f"this one and run its build command again (`msif build-demo --out {self.root}` "
                             "for the demo)")
        if not isinstance(data.get("stages"), dict) or not isinstance(data.get("files"), dict) or not all(
                isinstance(r, dict) and isinstance(r.get("files"), list) for r in data["stages"].values()):
            raise StudyError(f"{self.manifest_path} is damaged (its stages or files are missing); run "
                             f"`{self.rebuild_command(data)}` to rebuild the study")
        return data

    def rebuild_command(self, data: dict[str, Any] | None = None) -> str:
        """The command that builds (or repairs) this study, as recorded by the build, aimed at where
        the study is now (it may have moved since, or been named from another directory)."""
        data = data if data is not None else self.manifest()
        if isinstance(data.get("command"), list):
            return shlex.join(with_option(list(map(str, data["command"])), "--out", str(self.root)))
        if isinstance(data.get("demo"), dict):
            seed = data["demo"].get("seed", 0)
            return shlex.join(["msif", "build-demo", "--out", str(self.root), *(["--seed", str(seed)] if seed else [])])
        return shlex.join(["msif", "precompute", "--config", "STUDY.toml", "--out", str(self.root)])

    def stage_of(self, rel: str, data: dict[str, Any] | None = None) -> str:
        """The stage that wrote a study file (as the manifest records it)."""
        data = data if data is not None else self.manifest()
        return next((name for name, record in data["stages"].items() if rel in record["files"]), "unknown")

    # -- refusals -------------------------------------------------------------------------------
    def check_overwrite(self, key: str, expected: Any, force: bool = False) -> None:
        """Refuse to build into a directory that holds another study (its manifest's ``key``, e.g. the
        demo's seed and recipe or a study's config, differs from ``expected``) or other files, unless
        ``force``; nothing is touched either way."""
        if force or not self.root.exists():
            return
        if not self.root.is_dir():
            raise StudyError(f"{self.root} is a file, not a study directory: choose another --out")
        if not self.manifest_path.exists():
            others = sorted(p.name for p in self.root.iterdir() if p.name not in BOOKKEEPING)
            if others:
                raise StudyError(f"{self.root} is not empty and holds no study ({', '.join(others[:3])}"
                                 f"{', ...' if len(others) > 3 else ''}): choose another --out, or pass --force "
                                 "to build into it")
            return
        found = self.manifest().get(key)
        if found is None or jsonable(found) != jsonable(expected):
            raise StudyError(f"{self.root} holds another study ({_difference(key, found, jsonable(expected))}); "
                             "it was left as it is: choose another --out, or pass --force to rebuild it with "
                             "these settings (stages whose settings are unchanged are kept)")

    def remove_temporaries(self) -> list[str]:
        """Delete what killed writers left behind (atomic writes' ``.NAME.*.tmp``); call it only while
        holding the build lock, when nobody else can be writing."""
        left = sorted(p for p in self.root.rglob(".*.tmp")) if self.root.is_dir() else []
        for path in left:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        return [str(p.relative_to(self.root)) for p in left]

    # -- integrity ------------------------------------------------------------------------------
    def model_identity(self, locations: dict[str, str]) -> dict[str, dict[str, str]]:
        """sha256 of every file each model (or tokenizer) is loaded from, by role: a model's identity
        over all its weights, not a sample; recorded with the factors, verified on opening. A file that
        cannot be read is an error, never a missing checksum (that would turn the check off)."""
        from ..models import model_files

        out = {}
        for role, location in locations.items():
            files = [self._key(f) for f in model_files(self.resolve(location))]
            digests = self.digests(files)
            unreadable = [f for f in files if digests[f] is None]
            if unreadable:
                raise StudyError(f"{role_files(role, plural=False)} {unreadable[0]} cannot be read")
            out[role] = {Path(f).name: digests[f] for f in files}
        return out

    def recorded_identity(self, data: dict[str, Any]) -> dict[str, dict[str, str]]:
        """The models' identity recorded with the factors: {role: {file name: sha256}}."""
        return data["stages"].get(Stage.FACTORS_PRETRAINED, {}).get("config", {}).get("identity") or {}

    def unchecked_models(self, data: dict[str, Any]) -> list[str]:
        """The roles (base, finetuned, tokenizer) whose files have no recorded checksum, so that a
        changed file could not be noticed: what msif recorded for a study built under a relative
        path before study roots were resolved."""
        recorded = self.recorded_identity(data)
        return [role for role in MODEL_ROLES if not recorded.get(role)
                or not all(isinstance(d, str) for d in recorded[role].values())]

    def outdated(self, data: dict[str, Any]) -> list[str]:
        """What an older msif left out of a finished study, which its build command adds (rerunning
        only the stages concerned): the models' checksums, the index's whitened norms."""
        reasons = [f"no checksum of {role_files(role)}" for role in self.unchecked_models(data)]
        if Stage.INDEX in data["stages"] and INDEX_NORMS.path not in data["files"]:
            reasons.append("no whitened norms in the index")
        return reasons

    def _key(self, path: str | os.PathLike) -> str:
        """A file's name in the digest cache: study-relative inside the study, absolute outside."""
        path = Path(path).resolve()
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def digests(self, files: Iterable[str], progress: bool = False) -> dict[str, str | None]:
        """Current sha256 of study files (None when missing), cached between calls and processes."""
        cache = DigestCache(self.root)
        try:
            return cache.digests(self.root, files, progress)
        finally:
            cache.save()

    def damaged(self, data: dict[str, Any], files: Iterable[str] | None = None,
                progress: bool = False) -> list[str]:
        """The recorded files (of ``files``, or all) that are missing or differ from their checksum."""
        records = data["files"]
        wanted = [f for f in (records if files is None else files) if f in records]
        found = self.digests(wanted, progress)
        return [f for f in wanted if found[f] != records[f].get("sha256")]

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
        files = record["files"]
        return all(f in manifest["files"] for f in files) and not self.damaged(manifest, files)

    def record_stage(self, stage: str, written: Iterable[str | Artifact], config: Any = None,
                     info: dict | None = None) -> None:
        """Record a finished stage: its settings, its files with their checksums, ``info``."""
        written = [str(f) for f in written]
        data = self.manifest()
        before = data["stages"].get(stage, {}).get("files", [])
        for rel in set(before) - set(written):  # e.g. shards of a corpus that shrank
            data["files"].pop(rel, None)
        digests = self.digests(written)
        for rel in written:
            if digests[rel] is None:
                raise StudyError(f"stage {stage} said it wrote {rel}, which does not exist")
            data["files"][rel] = {"sha256": digests[rel], "size": self.path(rel).stat().st_size}
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

    def verify(self, required: Sequence[str] = READER_STAGES, progress: bool = False) -> dict[str, Any]:
        """The manifest, once the study exists, has the ``required`` stages and every file it lists
        matches its recorded sha256 (cached by stamp: an unchanged study verifies in milliseconds).
        Raises :class:`StudyError` saying what to do otherwise."""
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
                             f"run `{self.rebuild_command(data)}` to resume it")
        damaged = self.damaged(data, progress=progress)
        if damaged:
            rel = damaged[0]
            what = ("is missing" if not self.path(rel).exists()
                    else "changed after the study was built (checksum mismatch)")
            more = f" (and {len(damaged) - 1} more file{'s' * (len(damaged) > 2)})" if len(damaged) > 1 else ""
            raise StudyError(f"{rel} in {self.root} {what}{more}; it was written by the "
                             f"{self.stage_of(rel, data)} stage: run `{self.rebuild_command(data)}` to rebuild it")
        return data

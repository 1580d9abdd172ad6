"""sha256 of study files, remembered between openings.

Every reader verifies each file of a study against the checksum its manifest recorded before it
shows a result. Hashing a large study takes a while, so a file's digest is cached keyed by what a
write would change (size, mtime, ctime, inode); an unchanged study then reopens in milliseconds.
The cache lives beside the manifest but is not one of the study's checksummed files, and a study
that cannot be written (shared read-only) is simply hashed each time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

CACHE = ".verified.json"  # in the study directory; never listed in the manifest
PROGRESS_BYTES = 256 * 2**20  # hashing more than this shows a progress bar


def sha256_file(path: Path, chunk: int = 1 << 20, bar: tqdm | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            if bar is not None:
                bar.update(len(block))
    return digest.hexdigest()


def _stamp(path: Path) -> list[int]:
    s = path.stat()
    return [s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino]


class DigestCache:
    """Digests of one study's files (keys: study-relative paths), valid while a file's stamp holds."""

    def __init__(self, root: Path):
        self.path = Path(root) / CACHE
        self.entries: dict[str, dict] = {}
        self.dirty = False
        try:
            self.entries = json.loads(self.path.read_text()).get("files", {})
        except (OSError, ValueError, AttributeError):  # none yet, unreadable or damaged: start afresh
            self.entries = {}

    def digests(self, root: Path, files: Iterable[str], progress: bool = False) -> dict[str, str | None]:
        """sha256 of each study file (None for a missing one), hashing only those whose stamp changed."""
        out: dict[str, str | None] = {}
        todo: list[tuple[str, Path, list[int]]] = []
        for rel in files:
            path = root / rel
            try:
                stamp = _stamp(path)
            except OSError:
                out[rel] = None
                continue
            entry = self.entries.get(rel)
            if entry and entry.get("stamp") == stamp:
                out[rel] = entry["sha256"]
            else:
                todo.append((rel, path, stamp))
        total = sum(stamp[0] for _, _, stamp in todo)
        with tqdm(total=total, desc="verifying study files", unit="B", unit_scale=True, leave=False,
                  disable=not progress or total < PROGRESS_BYTES) as bar:
            for rel, path, stamp in todo:
                out[rel] = sha256_file(path, bar=bar)
                self.entries[rel] = {"stamp": stamp, "sha256": out[rel]}
                self.dirty = True
        return out

    def save(self) -> None:
        """Write the cache if it changed; a study that cannot be written keeps no cache."""
        if not self.dirty:
            return
        tmp = self.path.with_name(f"{CACHE}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"files": self.entries}))
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError:
            tmp.unlink(missing_ok=True)

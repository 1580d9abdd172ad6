"""Pretraining-document vectors as a study stores them: shards of .npy files.

Shard ``s`` holds documents ``[s * shard_size, (s + 1) * shard_size)`` in three files:
``projected`` (the Kronecker projection divided by the document's exact gradient norm, so that
16-bit storage is safe whatever the gradients' scale), ``whitened`` (the kept eigen-coordinates,
O(1) by construction) and ``sq_norms`` (float64). Scans read a shard at a time, random rows are read
exactly (``pread``); nothing concatenates a whole corpus in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..storage import decode_vectors, encode_vectors, save_npy, vector_width
from . import layout
from .manifest import Study

KINDS = tuple(layout.SHARD_KINDS)


def write_shard(study: Study, index: int, projected: np.ndarray, whitened: np.ndarray, sq_norms: np.ndarray,
                dtype: str) -> list[str]:
    """One shard's files (``projected`` raw, float32; it is divided by the norms here); their paths."""
    norms = np.sqrt(sq_norms).clip(min=1e-30)[:, None]
    arrays = {"projected": encode_vectors(projected / norms, dtype), "whitened": encode_vectors(whitened, dtype),
              "sq_norms": np.asarray(sq_norms, dtype=np.float64)}
    written = []
    for kind in ("projected", "whitened", "sq_norms"):  # sq_norms last: its presence marks a whole shard
        save_npy(study.path(layout.shard_file(index, kind)), arrays[kind])
        written.append(layout.shard_file(index, kind))
    return written


def shard_done(study: Study, index: int) -> bool:
    return study.path(layout.shard_file(index, "sq_norms")).exists()


_POOL: ThreadPoolExecutor | None = None


def _readers() -> ThreadPoolExecutor:
    """Threads for reading rows: os.pread releases the GIL, so a disk serves many reads at once."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(16, thread_name_prefix="msif-rows")
    return _POOL


@dataclass(frozen=True)
class _Header:
    offset: int  # where the rows start in the .npy file
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass
class DocumentVectors:
    """The study's document shards. Scans read whole shards one at a time; random rows (a query's
    candidates) are read with ``pread``, exactly their bytes, so that neither keeps pages mapped:
    the process's memory is what it allocates, and the page cache stays the kernel's."""

    study: Study
    shards: int
    dtype: str  # how projected and whitened rows are stored (engine.storage.VECTOR_DTYPES)
    documents: int = 0
    shard_size: int = 1024

    @classmethod
    def of(cls, study: Study) -> DocumentVectors:
        """The vectors the projection stage recorded in the study's manifest."""
        info = study.manifest()["stages"][layout.Stage.PROJECTION]["vectors"]
        return cls(study, info["shards"], info["dtype"], info["documents"], info["shard_size"])

    def __post_init__(self):
        self._headers: dict[tuple[int, str], _Header] = {}

    def _path(self, index: int, kind: str) -> str:
        return str(self.study.path(layout.shard_file(index, kind)))

    def _read(self, index: int, kind: str) -> np.ndarray:
        return np.load(self._path(index, kind))

    def _header(self, index: int, kind: str) -> _Header:
        key = (index, kind)
        if key not in self._headers:
            with open(self._path(index, kind), "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                if fortran:
                    raise ValueError(f"{self._path(index, kind)}: rows are not contiguous")
                self._headers[key] = _Header(f.tell(), shape, dtype)
        return self._headers[key]

    def sq_norms(self) -> np.ndarray:
        """(documents,) float64: small enough to read whole (8 bytes a document)."""
        return np.concatenate([self._read(i, "sq_norms") for i in range(self.shards)])

    def chunks(self, kind: str) -> Iterator[np.ndarray]:
        """float32 rows of ``kind``, one shard at a time, in document order; ``raw`` is the
        projected gradient itself (the stored rows times the exact norms), ``projected`` the
        stored unit-scale rows."""
        for _, rows in self.numbered_chunks(kind):
            yield rows

    def numbered_chunks(self, kind: str, shards: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first document id, float32 rows of ``kind``) per shard (all, or the ``shards`` given)."""
        stored = "projected" if kind == "raw" else kind
        for i in range(self.shards) if shards is None else shards:
            rows = decode_vectors(self._read(i, stored), self.dtype)
            if kind == "raw":
                rows = rows * np.sqrt(self._read(i, "sq_norms"))[:, None].astype(np.float32)
            yield i * self.shard_size, rows

    def gather(self, kind: str, ids: np.ndarray) -> np.ndarray:
        """float32 rows of ``kind`` ("projected" or "whitened") for sorted document ids: runs of
        consecutive rows read with one ``pread`` each, several shards at once, then decoded in one
        call on this thread (torch ops on the reader threads would start a thread team per reader)."""
        ids = np.asarray(ids, np.int64)
        shard_of = ids // self.shard_size
        shards = [int(s) for s in np.unique(shard_of)]
        headers = {s: self._header(s, kind) for s in shards}
        first = headers[shards[0]] if shards else self._header(0, kind)
        stored = np.empty((len(ids), *first.shape[1:]), first.dtype)  # sorted ids: a shard's rows are one slice

        def read(s: int) -> None:
            where = np.flatnonzero(shard_of == s)
            rows, header = ids[where] - s * self.shard_size, headers[s]
            width = int(np.prod(header.shape[1:])) * header.dtype.itemsize
            breaks = np.flatnonzero(np.diff(rows) != 1) + 1
            fd = os.open(self._path(s, kind), os.O_RDONLY)
            try:
                for run_where, run in zip(np.split(where, breaks), np.split(rows, breaks)):
                    into = stored[run_where[0]:run_where[-1] + 1]
                    if os.preadv(fd, [into], header.offset + int(run[0]) * width) != into.nbytes:
                        raise OSError(f"{self._path(s, kind)}: shorter than its header says")
            finally:
                os.close(fd)

        if len(shards) < 4:
            for s in shards:
                read(s)
        else:
            list(_readers().map(read, shards))
        return decode_vectors(stored, self.dtype)

    def kinds(self) -> tuple[str, ...]:
        """The vector kinds the shards hold (older studies also the Kronecker projection)."""
        return tuple(k for k in KINDS if k != "sq_norms" and os.path.exists(self._path(0, k)))

    def dim(self, kind: str) -> int:
        return vector_width(int(self._header(0, "projected" if kind == "raw" else kind).shape[1]), self.dtype)

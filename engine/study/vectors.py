"""Pretraining-document vectors as a study stores them: shards of memory-mapped .npy files.

Shard ``s`` holds documents ``[s * shard_size, (s + 1) * shard_size)`` in three files:
``projected`` (the Kronecker projection divided by the document's exact gradient norm, so that
16-bit storage is safe whatever the gradients' scale), ``whitened`` (the kept eigen-coordinates,
O(1) by construction) and ``sq_norms`` (float64). Rows are read through memory maps, a chunk at
a time; nothing concatenates a whole corpus in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..storage import decode_vectors, encode_vectors, save_npy
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


@dataclass
class DocumentVectors:
    """The study's document shards, memory-mapped."""

    study: Study
    shards: int
    dtype: str  # how projected and whitened rows are stored (float16 | bfloat16 | float32)
    documents: int = 0

    @classmethod
    def of(cls, study: Study) -> DocumentVectors:
        """The vectors the projection stage recorded in the study's manifest."""
        info = study.manifest()["stages"][layout.Stage.PROJECTION]["vectors"]
        return cls(study, info["shards"], info["dtype"], info["documents"])

    def _map(self, index: int, kind: str) -> np.ndarray:
        return np.load(self.study.path(layout.shard_file(index, kind)), mmap_mode="r")

    def sq_norms(self) -> np.ndarray:
        """(documents,) float64: small enough to read whole (8 bytes a document)."""
        return np.concatenate([np.asarray(self._map(i, "sq_norms")) for i in range(self.shards)])

    def chunks(self, kind: str) -> Iterator[np.ndarray]:
        """float32 rows of ``kind``, one shard at a time, in document order; ``raw`` is the
        projected gradient itself (the stored rows times the exact norms), ``projected`` the
        stored unit-scale rows."""
        stored = "projected" if kind == "raw" else kind
        for i in range(self.shards):
            rows = decode_vectors(self._map(i, stored), self.dtype)
            if kind == "raw":
                rows = rows * np.sqrt(np.asarray(self._map(i, "sq_norms")))[:, None].astype(np.float32)
            yield rows

    def dim(self, kind: str) -> int:
        return int(self._map(0, "projected" if kind == "raw" else kind).shape[1])

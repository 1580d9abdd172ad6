"""The engine's one way to write tensors: safetensors, atomically, byte-for-byte reproducible."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import save


def _canonical(blob: bytes) -> bytes:
    """Rewrite the JSON header with sorted keys: safetensors orders metadata by a per-process hash,
    so the same tensors would otherwise give different bytes (and checksums) in each run."""
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(text)) + text + blob[8 + length:]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds,
    so readers (and resumed builds) never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 metadata: Mapping[str, str]) -> None:
    """safetensors with a canonical header, written atomically."""
    blob = _canonical(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                           metadata=dict(metadata)))
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)

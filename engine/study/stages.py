"""Running a build: an ordered table of stages, each run once for its settings and then recorded.

A stage is skipped when the manifest records it with the same settings and its files are intact
(``Study.is_done``); otherwise it runs and is recorded with its files, settings, time and memory.
Settings are evaluated when the stage's turn comes, so that a stage can depend on what an earlier
one produced (the demo's pipeline settings hold the proximity measured by its fine-tuning stage).
Under torchrun every rank walks the same table: each stage runs on rank 0 (or, ``every_rank``, on
all ranks, each doing its share), and rank 0 alone records it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import distributed as dist
from ..resources import Meter
from .manifest import Study


@dataclass(frozen=True)
class StageRun:
    """One row of a build's table."""

    name: str  # a ``layout.Stage`` name
    settings: Callable[[], Any]  # what its files depend on (compared with the manifest's record)
    produce: Callable[[], Iterable[str]]  # writes its files, returns them (study-relative)
    every_rank: bool = False  # run on every rank (each does its share) instead of rank 0 alone
    info: Callable[[], dict] | None = None  # more to record with it, asked after it ran


def run_stages(study: Study, stages: Sequence[StageRun]) -> list[str]:
    """Run the stages in order, each unless done; returns the names of those that ran."""
    return [stage.name for stage in stages if run_stage(study, stage)]


def run_stage(study: Study, stage: StageRun) -> bool:
    """Run one stage unless it is done (every rank agrees), then record it; True when it ran."""
    dist.barrier()
    settings = stage.settings()
    if study.is_done(stage.name, settings):
        return False
    with Meter() as meter:
        written = stage.produce() if stage.every_rank or dist.is_main() else []
    dist.barrier()
    if dist.is_main():
        info = stage.info() if stage.info else {}
        study.record_stage(stage.name, written, settings, {**info, "usage": meter.usage.to_json()})
    dist.barrier()
    return True

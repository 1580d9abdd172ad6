"""The study format, owned here and nowhere else: a study is one self-describing directory per
(pretrained model, fine-tuned model, corpus) that precompute writes and the explorer reads.

- :mod:`~engine.study.layout`: every path in one table, stage names, what a reader needs (no torch);
- :mod:`~engine.study.config`: the config schema and the prompt template;
- :mod:`~engine.study.manifest`: the manifest, stages recorded, verification;
- :mod:`~engine.study.stages`: a build as an ordered table of stages, run by one loop;
- :mod:`~engine.study.vectors` and :mod:`~engine.study.index`: document vectors in shards, the search index;
- :mod:`~engine.study.opened`: :func:`open_study`, a finished study as one typed bundle.
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "config": ["DOLLY_INTRO", "DatasetConfig", "FinetuneDataConfig", "InfluenceConfig", "ModelsConfig",
               "PromptTemplate", "StudyConfig", "dolly_template"],
    "index": ["IndexSettings", "StudyIndex", "VectorSearch", "build_index"],
    "layout": ["DEFAULT_STUDY", "Stage"],
    "manifest": ["Study", "StudyError", "jsonable", "sha256_file"],
    "opened": ["OpenedStudy", "StageModel", "held_precision", "open_study"],
    "stages": ["StageRun", "run_stages"],
}

__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

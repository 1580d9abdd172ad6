"""`build-demo`: the default study, built offline on a CPU in minutes.

A generated world with known facts, a BPE tokenizer, a small GPT-NeoX pretrained on the world's
encyclopedia, a fully fine-tuned dolly-style child (with the proximity term), how well the child
answers questions it only saw in pretraining, and then the same pipeline as real studies
(factors for both stages, projected gradients, indexes). Same seed, same study.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from engine import distributed as dist
from engine.models import resolve_device
from engine.storage import atomic_dir, atomic_path, write_json, write_text
from engine.study import (
    DatasetConfig,
    FinetuneDataConfig,
    InfluenceConfig,
    ModelsConfig,
    PromptTemplate,
    Stage,
    StageRun,
    Study,
    StudyConfig,
    jsonable,
    layout,
    run_stages,
)

from . import training
from . import world as world_lib
from .pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass
class DemoRecipe:
    """Every setting of a demo build; saved in the manifest."""

    world: dict = field(default_factory=dict)  # overrides of world.WorldConfig
    vocab_size: int = 2048
    model: dict = field(default_factory=dict)  # overrides of training.demo_model_config
    pretrain: training.PretrainConfig = field(default_factory=training.PretrainConfig)
    finetune: training.FinetuneConfig = field(default_factory=training.FinetuneConfig)
    # 4,096 whitened coordinates a layer in int4 take the bytes of 1,024 in float16 and serve the
    # haystack's exact top 10 far better (docs/vector_storage.md: 0.93 of it against 0.76, seed 0)
    influence: InfluenceConfig = field(default_factory=lambda: InfluenceConfig(
        label_samples=2, max_length=256, batch_size=16, projection_dim=256, candidates=75, eigen_dim=4096,
        vector_dtype="int4"))


def tiny_recipe() -> DemoRecipe:
    """A world and models small enough for CI (seconds): the same code path, not a useful study."""
    return DemoRecipe(
        world={"n_people": 12, "n_towns": 6, "n_countries": 3, "n_orgs": 4, "n_documents": 120,
               "n_closed_qa": 4, "n_classification": 4, "n_brainstorming": 4, "n_summarization": 4},
        vocab_size=400, model={"hidden_size": 32, "num_layers": 2, "num_heads": 2},
        pretrain=training.PretrainConfig(epochs=2, batch_size=8, block_size=64, warmup_steps=5),
        finetune=training.FinetuneConfig(epochs=1, batch_size=8, warmup_steps=2),
        # float64 sums: the two-process test compares factors at 1e-10
        influence=InfluenceConfig(max_length=128, batch_size=8, projection_dim=64, candidates=20,
                                  accumulation="float64"))


def build_demo(out: str | Path, seed: int = 0, recipe: DemoRecipe | None = None,
               progress: bool = True, extra_documents: int | None = None, command: list[str] | None = None) -> Study:
    """Build (or resume) the demo study in ``out``: the demo's stages, then the pipeline's, each
    skipped when already done (``engine.study.run_stages``).

    ``extra_documents``: a haystack of that many generated documents added to the corpus after
    training (``precompute.haystack``); None keeps what the study has (none for a new study).
    ``command``: the command line that rebuilds it, recorded for repair messages.
    """
    recipe = recipe or DemoRecipe()
    study = Study(out)
    dist.init(resolve_device("auto"))  # under torchrun, rank 0 alone trains; all ranks run the pipeline
    if dist.is_main():  # which study this is, recorded first: a resumed build is the same study
        study.update_manifest(demo={"seed": seed, "recipe": recipe_json(recipe)}, **({"command": command} if command
                                                                                      else {}))
    demo = DemoBuild(study, seed, recipe, progress and dist.is_main(), _haystack_size(study, extra_documents))
    run_stages(study, demo.stages() + Pipeline(study, demo.pipeline_config, progress).stages())
    return study


class DemoBuild:
    """The demo's own stages, as a table: the world, its tokenizer, the two training stages, how
    well the child answers, the haystack; their settings chain (the tokenizer depends on the world's
    settings, pretraining on both, and so on)."""

    def __init__(self, study: Study, seed: int, recipe: DemoRecipe, progress: bool, extra: int):
        self.study, self.seed, self.recipe, self.progress, self.extra = study, seed, recipe, progress, extra
        self.reports: dict = {}
        world = {"seed": seed, "world": recipe.world}
        self.settings = {Stage.WORLD: world, Stage.TOKENIZER: {**world, "vocab_size": recipe.vocab_size}}
        self.settings[Stage.PRETRAIN] = {**self.settings[Stage.TOKENIZER], "model": recipe.model,
                                         "pretrain": asdict(recipe.pretrain)}
        self.settings[Stage.FINETUNE] = {**self.settings[Stage.PRETRAIN], "finetune": asdict(recipe.finetune)}
        self.settings[Stage.QA_EVAL] = {**self.settings[Stage.FINETUNE],
                                        "outputs": [layout.QA_REPORT.path, layout.DEMO_PROMPTS.path]}
        self.settings[Stage.HAYSTACK] = {**world, "documents": extra}

    def stages(self) -> list[StageRun]:
        def report(stage: str) -> Callable[[], dict]:
            return lambda: {"report": self.reports.pop(stage)}

        produce = {Stage.WORLD: self._write_world, Stage.TOKENIZER: self._train_tokenizer,
                   Stage.PRETRAIN: self._pretrain, Stage.FINETUNE: self._finetune, Stage.QA_EVAL: self._evaluate,
                   Stage.HAYSTACK: self._write_haystack}
        return [StageRun(name, lambda name=name: self.settings[name], produce[name],
                         info=report(name) if name in (Stage.PRETRAIN, Stage.FINETUNE) else None)
                for name in layout.DEMO_STAGES]

    @cached_property
    def world(self) -> world_lib.World:
        return world_lib.World.from_jsonl(self.study.path(layout.WORLD_DIR))

    @cached_property
    def tokenizer(self):
        return training_tokenizer(self.study)

    def pipeline_config(self) -> StudyConfig:
        """The demo as an ordinary study config, once its fine-tuning stage has measured alpha."""
        alpha = self.study.manifest()["stages"][Stage.FINETUNE]["report"]["alpha_engine"]
        return study_config(self.recipe, alpha, self.tokenizer.eos_token, len(self.world.documents), self.extra)

    def _write_world(self) -> list[str]:
        generated = world_lib.build_world(self.seed, **self.recipe.world)
        with atomic_dir(self.study.path(layout.WORLD_DIR)) as tmp:
            generated.to_jsonl(tmp)
        return self.study.files_under(layout.WORLD_DIR)

    def _train_tokenizer(self) -> list[str]:
        tokenizer = world_lib.train_tokenizer(world_lib.tokenizer_texts(self.world), self.recipe.vocab_size)
        with atomic_dir(self.study.path(layout.TOKENIZER_DIR)) as tmp:
            tokenizer.save_pretrained(tmp)
        return self.study.files_under(layout.TOKENIZER_DIR)

    def _pretrain(self) -> list[str]:
        config = training.demo_model_config(len(self.tokenizer), **self.recipe.model)
        model, report = training.pretrain(config, self.tokenizer, self.world.documents, self.recipe.pretrain,
                                          self.progress)
        _save_model(self.study, layout.PRETRAINED_DIR, model, self.tokenizer)
        self.reports[Stage.PRETRAIN] = _summary(report)
        return self.study.files_under(layout.PRETRAINED_DIR)

    def _finetune(self) -> list[str]:
        model, report = training.finetune(_load(self.study, layout.PRETRAINED_DIR), self.tokenizer,
                                          self.world.finetune_records, self.recipe.finetune, self.progress)
        _save_model(self.study, layout.FINETUNED_DIR, model, self.tokenizer)
        self.reports[Stage.FINETUNE] = _summary(report)
        return self.study.files_under(layout.FINETUNED_DIR)

    def _evaluate(self) -> list[str]:
        """Can the fine-tuned model answer what it only read in pretraining? (the demo's premise)"""
        model = _load(self.study, layout.FINETUNED_DIR)
        result = {split: training.exact_match_accuracy(model, self.tokenizer, self.world.facts, split=split,
                                                       intro=self.recipe.finetune.intro, all_facts=self.world.facts)
                  for split in ("pretrain_only", "finetune")}
        write_json(self.study.path(layout.QA_REPORT), result)
        for split, r in result.items():
            log.info("%s questions: %.1f%% contain the answer, %.1f%% strict exact match (n=%d)",
                     split, 100 * r["contains_answer"], 100 * r["strict_em"], r["n"])
        rows = result["pretrain_only"]["rows"]
        chosen = [r for r in rows if r["contains_answer"]][:5] or rows[:5]
        write_text(self.study.path(layout.DEMO_PROMPTS), "".join(json.dumps({"prompt": r["question"]}) + "\n"
                                                                 for r in chosen))
        return [layout.QA_REPORT.path, layout.DEMO_PROMPTS.path]

    def _write_haystack(self) -> list[str]:
        from . import haystack

        with atomic_path(self.study.path(layout.HAYSTACK)) as tmp:
            haystack.write(tmp, self.seed, self.extra, haystack.Names.outside(self.world), self.progress)
        return [layout.HAYSTACK.path]


def _haystack_size(study: Study, requested: int | None) -> int:
    if requested is not None:
        if requested < 0:
            raise ValueError(f"--extra-documents must be >= 0, got {requested}")
        return requested
    record = study.manifest()["stages"].get(Stage.HAYSTACK)
    return int(record["config"]["documents"]) if record else 0


def study_config(recipe: DemoRecipe, alpha: float, eos: str, world_documents: int, extra: int = 0) -> StudyConfig:
    """The demo as an ordinary study config: paths relative to the study directory. Factors are fit
    on the world's documents (what the model was trained on), not on a haystack after them."""
    prompts = PromptTemplate.dolly(recipe.finetune.intro, response_suffix=eos)
    return StudyConfig(
        models=ModelsConfig(base=layout.PRETRAINED_DIR.path, finetuned=layout.FINETUNED_DIR.path,
                            tokenizer=layout.TOKENIZER_DIR.path, dtype="float32", device="auto"),
        pretraining=DatasetConfig(path=layout.WORLD_DOCUMENTS.path, title_field="title",
                                  more=[layout.HAYSTACK.path] if extra else []),
        finetuning=FinetuneDataConfig(path=layout.WORLD_RECORDS.path),
        influence=InfluenceConfig(**{**asdict(recipe.influence), "alpha": alpha,
                                     "factor_documents": world_documents}),
        template=prompts.template, context_template=prompts.context_template,
        response_suffix=prompts.response_suffix,
    )


def training_tokenizer(study: Study):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(study.path(layout.TOKENIZER_DIR)))


def qa_summary(study: Study) -> dict:
    data = json.loads(study.path(layout.QA_REPORT).read_text())
    return {split: {k: r[k] for k in ("n", "contains_answer", "strict_em")} for split, r in data.items()}


def _load(study: Study, directory: layout.Artifact):
    from transformers import GPTNeoXForCausalLM

    return GPTNeoXForCausalLM.from_pretrained(str(study.path(directory)), dtype=torch.float32).eval()


def _save_model(study: Study, directory: layout.Artifact, model, tokenizer) -> None:
    with atomic_dir(study.path(directory)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _summary(report: dict) -> dict:
    """The JSON-friendly scalars of a training report (curves are kept short)."""
    return {k: v for k, v in report.items() if isinstance(v, (int, float, str, bool))}


def recipe_json(recipe: DemoRecipe) -> dict:
    """The recipe as the manifest records it (``demo.recipe``)."""
    return jsonable(recipe)

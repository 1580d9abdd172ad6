"""`build-demo`: the default study, built offline on a CPU in minutes.

A generated world with known facts, a BPE tokenizer, a small GPT-NeoX pretrained on the world's
encyclopedia, a fully fine-tuned dolly-style child (with the proximity term), how well the child
answers questions it only saw in pretraining, and then the same pipeline as real studies
(factors for both stages, projected gradients, indexes). Same seed, same study.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
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
    Study,
    StudyConfig,
    jsonable,
    layout,
)

from . import training
from . import world as world_lib
from .pipeline import run_pipeline, run_stage

log = logging.getLogger(__name__)


@dataclass
class DemoRecipe:
    """Every setting of a demo build; saved in the manifest."""

    world: dict = field(default_factory=dict)  # overrides of world.WorldConfig
    vocab_size: int = 2048
    model: dict = field(default_factory=dict)  # overrides of training.demo_model_config
    pretrain: training.PretrainConfig = field(default_factory=training.PretrainConfig)
    finetune: training.FinetuneConfig = field(default_factory=training.FinetuneConfig)
    influence: InfluenceConfig = field(default_factory=lambda: InfluenceConfig(
        label_samples=2, max_length=256, batch_size=16, projection_dim=256, candidates=150))


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
    """Build (or resume) the demo study in ``out``; every stage is skipped when already done.

    ``extra_documents``: a haystack of that many generated documents added to the corpus after
    training (``precompute.haystack``); None keeps what the study has (none for a new study).
    ``command``: the command line that rebuilds it, recorded for repair messages.
    """
    recipe = recipe or DemoRecipe()
    study = Study(out)
    dist.init(resolve_device("auto"))  # under torchrun, rank 0 alone trains; all ranks run the pipeline
    progress = progress and dist.is_main()
    if dist.is_main():  # which study this is, recorded first: a resumed build is the same study
        study.update_manifest(demo={"seed": seed, "recipe": recipe_json(recipe)}, **({"command": command} if command
                                                                                      else {}))
    world_config = {"seed": seed, "world": recipe.world}
    run_stage(study, Stage.WORLD, lambda: _write_world(study, seed, recipe), world_config)
    world = world_lib.World.from_jsonl(study.path(layout.WORLD_DIR))

    tok_config = {**world_config, "vocab_size": recipe.vocab_size}
    run_stage(study, Stage.TOKENIZER, lambda: _train_tokenizer(study, world, recipe), tok_config)
    tokenizer = training_tokenizer(study)

    pt_config = {**tok_config, "model": recipe.model, "pretrain": asdict(recipe.pretrain)}
    reports: dict = {}
    run_stage(study, Stage.PRETRAIN, lambda: _pretrain(study, world, tokenizer, recipe, reports, progress),
              pt_config, info=lambda: {"report": reports.pop("pretrain")})
    ft_config = {**pt_config, "finetune": asdict(recipe.finetune)}
    run_stage(study, Stage.FINETUNE, lambda: _finetune(study, world, tokenizer, recipe, reports, progress),
              ft_config, info=lambda: {"report": reports.pop("finetune")})
    run_stage(study, Stage.QA_EVAL, lambda: _evaluate(study, world, tokenizer, recipe),
              {**ft_config, "outputs": [layout.QA_REPORT.path, layout.DEMO_PROMPTS.path]})

    extra = _haystack_size(study, extra_documents)
    run_stage(study, Stage.HAYSTACK, lambda: _write_haystack(study, world, seed, extra, progress),
              {**world_config, "documents": extra})

    alpha = study.manifest()["stages"][Stage.FINETUNE]["report"]["alpha_engine"]
    run_pipeline(study_config(recipe, alpha, tokenizer.eos_token, len(world.documents), extra), out,
                 progress=progress)
    return study


def _haystack_size(study: Study, requested: int | None) -> int:
    if requested is not None:
        if requested < 0:
            raise ValueError(f"--extra-documents must be >= 0, got {requested}")
        return requested
    record = study.manifest()["stages"].get(Stage.HAYSTACK)
    return int(record["config"]["documents"]) if record else 0


def _write_haystack(study: Study, world, seed: int, count: int, progress: bool) -> list[str]:
    from . import haystack

    with atomic_path(study.path(layout.HAYSTACK)) as tmp:
        haystack.write(tmp, seed, count, haystack.Names.outside(world), progress)
    return [layout.HAYSTACK.path]


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


def _write_world(study: Study, seed: int, recipe: DemoRecipe) -> list[str]:
    generated = world_lib.build_world(seed, **recipe.world)
    with atomic_dir(study.path(layout.WORLD_DIR)) as tmp:
        generated.to_jsonl(tmp)
    return study.files_under(layout.WORLD_DIR)


def _train_tokenizer(study: Study, world, recipe: DemoRecipe) -> list[str]:
    tokenizer = world_lib.train_tokenizer(world_lib.tokenizer_texts(world), recipe.vocab_size)
    with atomic_dir(study.path(layout.TOKENIZER_DIR)) as tmp:
        tokenizer.save_pretrained(tmp)
    return study.files_under(layout.TOKENIZER_DIR)


def _pretrain(study: Study, world, tokenizer, recipe: DemoRecipe, reports: dict,
              progress: bool) -> list[str]:
    config = training.demo_model_config(len(tokenizer), **recipe.model)
    model, report = training.pretrain(config, tokenizer, world.documents, recipe.pretrain, progress)
    _save_model(study, layout.PRETRAINED_DIR, model, tokenizer)
    reports["pretrain"] = _summary(report)
    return study.files_under(layout.PRETRAINED_DIR)


def _finetune(study: Study, world, tokenizer, recipe: DemoRecipe, reports: dict,
              progress: bool) -> list[str]:
    pt_model = _load(study, layout.PRETRAINED_DIR)
    model, report = training.finetune(pt_model, tokenizer, world.finetune_records, recipe.finetune,
                                      progress)
    _save_model(study, layout.FINETUNED_DIR, model, tokenizer)
    reports["finetune"] = _summary(report)
    return study.files_under(layout.FINETUNED_DIR)


def _evaluate(study: Study, world, tokenizer, recipe: DemoRecipe) -> list[str]:
    """Can the fine-tuned model answer what it only read in pretraining? (the demo's premise)"""
    model = _load(study, layout.FINETUNED_DIR)
    result = {split: training.exact_match_accuracy(model, tokenizer, world.facts, split=split,
                                                   intro=recipe.finetune.intro, all_facts=world.facts)
              for split in ("pretrain_only", "finetune")}
    write_json(study.path(layout.QA_REPORT), result)
    for split, r in result.items():
        log.info("%s questions: %.1f%% contain the answer, %.1f%% strict exact match (n=%d)",
                 split, 100 * r["contains_answer"], 100 * r["strict_em"], r["n"])
    rows = result["pretrain_only"]["rows"]
    chosen = [r for r in rows if r["contains_answer"]][:5] or rows[:5]
    write_text(study.path(layout.DEMO_PROMPTS), "".join(json.dumps({"prompt": r["question"]}) + "\n"
                                                        for r in chosen))
    return [layout.QA_REPORT.path, layout.DEMO_PROMPTS.path]


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

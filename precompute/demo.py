"""`msif build-demo`: the default study, built offline on a CPU in minutes.

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

from . import training, world as world_lib
from .config import DatasetConfig, FinetuneDataConfig, InfluenceConfig, ModelsConfig, StudyConfig
from .pipeline import run_pipeline
from .study import Study, atomic_dir, atomic_path, write_json

log = logging.getLogger(__name__)

WORLD_DIR = "world"
TOKENIZER_DIR = "tokenizer"
PRETRAINED_DIR = "models/pretrained"
FINETUNED_DIR = "models/finetuned"
QA_EVAL = "world/qa_eval.json"
DEMO_PROMPTS = "world/demo_prompts.jsonl"  # pretraining-only questions the model gets right


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
        influence=InfluenceConfig(max_length=128, batch_size=8, projection_dim=64, candidates=20))


def build_demo(out: str | Path, seed: int = 0, recipe: DemoRecipe | None = None,
               progress: bool = True) -> Study:
    """Build (or resume) the demo study in ``out``; every stage is skipped when already done."""
    recipe = recipe or DemoRecipe()
    study = Study(out)
    study.update_manifest(demo={"seed": seed, "recipe": _jsonable(recipe)})
    world_config = {"seed": seed, "world": recipe.world}
    study.run_stage("world", lambda: _write_world(study, seed, recipe), config=world_config)
    world = world_lib.World.from_jsonl(study.path(WORLD_DIR))

    tok_config = {**world_config, "vocab_size": recipe.vocab_size}
    study.run_stage("tokenizer", lambda: _train_tokenizer(study, world, recipe), config=tok_config)
    tokenizer = training_tokenizer(study)

    pt_config = {**tok_config, "model": recipe.model, "pretrain": asdict(recipe.pretrain)}
    reports: dict = {}
    study.run_stage("pretrain", lambda: _pretrain(study, world, tokenizer, recipe, reports, progress),
                    config=pt_config, info=lambda: {"report": reports.pop("pretrain")})
    ft_config = {**pt_config, "finetune": asdict(recipe.finetune)}
    study.run_stage("finetune", lambda: _finetune(study, world, tokenizer, recipe, reports, progress),
                    config=ft_config, info=lambda: {"report": reports.pop("finetune")})
    study.run_stage("qa-eval", lambda: _evaluate(study, world, tokenizer, recipe),
                    config={**ft_config, "outputs": [QA_EVAL, DEMO_PROMPTS]})

    alpha = study.manifest()["stages"]["finetune"]["report"]["alpha_engine"]
    run_pipeline(study_config(recipe, alpha, tokenizer.eos_token), out, progress=progress)
    return study


def study_config(recipe: DemoRecipe, alpha: float, eos: str) -> StudyConfig:
    """The demo as an ordinary study config: paths relative to the study directory."""
    intro = recipe.finetune.intro
    return StudyConfig(
        models=ModelsConfig(base=PRETRAINED_DIR, finetuned=FINETUNED_DIR, tokenizer=TOKENIZER_DIR,
                            dtype="float32", device="auto"),
        pretraining=DatasetConfig(path=f"{WORLD_DIR}/documents.jsonl", title_field="title"),
        finetuning=FinetuneDataConfig(path=f"{WORLD_DIR}/finetune.jsonl"),
        influence=InfluenceConfig(**{**asdict(recipe.influence), "alpha": alpha}),
        template=world_lib.format_prompt("{instruction}", "", intro),
        context_template=world_lib.format_prompt("{instruction}", "{context}", intro),
        response_suffix=eos,
    )


def training_tokenizer(study: Study):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(study.path(TOKENIZER_DIR)))


def _write_world(study: Study, seed: int, recipe: DemoRecipe) -> list[str]:
    generated = world_lib.build_world(seed, **recipe.world)
    with atomic_dir(study.path(WORLD_DIR)) as tmp:
        generated.to_jsonl(tmp)
    return study.files_under(WORLD_DIR)


def _train_tokenizer(study: Study, world, recipe: DemoRecipe) -> list[str]:
    tokenizer = world_lib.train_tokenizer(world_lib.tokenizer_texts(world), recipe.vocab_size)
    with atomic_dir(study.path(TOKENIZER_DIR)) as tmp:
        tokenizer.save_pretrained(tmp)
    return study.files_under(TOKENIZER_DIR)


def _pretrain(study: Study, world, tokenizer, recipe: DemoRecipe, reports: dict,
              progress: bool) -> list[str]:
    config = training.demo_model_config(len(tokenizer), **recipe.model)
    model, report = training.pretrain(config, tokenizer, world.documents, recipe.pretrain, progress)
    _save_model(study, PRETRAINED_DIR, model, tokenizer)
    reports["pretrain"] = _summary(report)
    return study.files_under(PRETRAINED_DIR)


def _finetune(study: Study, world, tokenizer, recipe: DemoRecipe, reports: dict,
              progress: bool) -> list[str]:
    pt_model = _load(study, PRETRAINED_DIR)
    model, report = training.finetune(pt_model, tokenizer, world.finetune_records, recipe.finetune,
                                      progress)
    _save_model(study, FINETUNED_DIR, model, tokenizer)
    reports["finetune"] = _summary(report)
    return study.files_under(FINETUNED_DIR)


def _evaluate(study: Study, world, tokenizer, recipe: DemoRecipe) -> list[str]:
    """Can the fine-tuned model answer what it only read in pretraining? (the demo's premise)"""
    model = _load(study, FINETUNED_DIR)
    result = {split: training.exact_match_accuracy(model, tokenizer, world.facts, split=split,
                                                   intro=recipe.finetune.intro, all_facts=world.facts)
              for split in ("pretrain_only", "finetune")}
    write_json(study.path(QA_EVAL), result)
    for split, r in result.items():
        log.info("%s questions: %.1f%% contain the answer, %.1f%% strict exact match (n=%d)",
                 split, 100 * r["contains_answer"], 100 * r["strict_em"], r["n"])
    rows = result["pretrain_only"]["rows"]
    chosen = [r for r in rows if r["contains_answer"]][:5] or rows[:5]
    with atomic_path(study.path(DEMO_PROMPTS)) as tmp:
        tmp.write_text("".join(json.dumps({"prompt": r["question"]}) + "\n" for r in chosen))
    return [QA_EVAL, DEMO_PROMPTS]


def qa_summary(study: Study) -> dict:
    data = json.loads(study.path(QA_EVAL).read_text())
    return {split: {k: r[k] for k in ("n", "contains_answer", "strict_em")} for split, r in data.items()}


def _load(study: Study, relative: str):
    from transformers import GPTNeoXForCausalLM

    return GPTNeoXForCausalLM.from_pretrained(str(study.path(relative)), dtype=torch.float32).eval()


def _save_model(study: Study, relative: str, model, tokenizer) -> None:
    with atomic_dir(study.path(relative)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _summary(report: dict) -> dict:
    """The JSON-friendly scalars of a training report (curves are kept short)."""
    return {k: v for k, v in report.items() if isinstance(v, (int, float, str, bool))}


def _jsonable(value):
    return json.loads(json.dumps(asdict(value), default=str))

"""Study configuration: every knob of a precompute run, read from TOML, saved in the manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# databricks/dolly-v2's instruction template (instruct_pipeline.py), with and without context.
DOLLY_INTRO = ("Below is an instruction that describes a task. Write a response that "
               "appropriately completes the request.")
DOLLY_TEMPLATE = DOLLY_INTRO + "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
DOLLY_CONTEXT_TEMPLATE = (DOLLY_INTRO + "\n\n### Instruction:\n{instruction}\n\nInput:\n{context}"
                          "\n\n### Response:\n")


@dataclass
class ModelsConfig:
    base: str = ""  # theta_pt: a Hugging Face id or a local save_pretrained directory
    finetuned: str = ""  # theta_ft
    tokenizer: str = ""  # default: the fine-tuned model's
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class DatasetConfig:
    """A datasets spec: a hub name, or a local .jsonl/.json/.parquet/.txt file or folder."""

    path: str = ""
    name: str = ""  # dataset configuration name, if any
    split: str = "train"
    text_field: str = "text"
    title_field: str = ""
    limit: int = 0  # 0 = all
    streaming: bool = False


@dataclass
class FinetuneDataConfig(DatasetConfig):
    """Fine-tuning records in databricks-dolly-15k format."""

    instruction_field: str = "instruction"
    context_field: str = "context"
    response_field: str = "response"
    category_field: str = "category"


@dataclass
class InfluenceConfig:
    alpha: float = 1.0  # fine-tuning proximity on the engine's scale (summed sequence losses)
    damping: float | None = None  # absolute lambda; None = damping_factor x mean eigenvalue
    damping_factor: float = 0.1
    strategy: str = "ekfac"
    label_samples: int = 1
    factor_documents: int = 0  # pretraining documents used to fit H_pt; 0 = all
    max_length: int = 512
    batch_size: int = 8
    include: list[str] = field(default_factory=list)  # tracked-layer regexes; empty = default
    exclude: list[str] = field(default_factory=list)
    projection_dim: int = 256  # per tracked layer (k_out * k_in), for the raw-gradient indexes
    eigen_dim: int = 1024  # per tracked layer: top eigen-coordinates kept for multi-stage retrieval
    index: str = "flat"  # flat (exact inner product) | ivf
    candidates: int = 150  # per sign: retrieved by the index, re-scored exactly, best top_k shown
    seed: int = 0


@dataclass
class StudyConfig:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    pretraining: DatasetConfig = field(default_factory=DatasetConfig)
    finetuning: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    template: str = DOLLY_TEMPLATE
    context_template: str = DOLLY_CONTEXT_TEMPLATE
    response_suffix: str = ""  # appended to responses when fitting H_ft, as in training (e.g. EOS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StudyConfig":
        return _build(cls, data, "config")

    @classmethod
    def from_toml(cls, path: str | Path) -> "StudyConfig":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path} is not valid TOML: {err}") from None
        config = cls.from_dict(data)
        config.validate()
        return config

    def validate(self) -> None:
        if not self.models.base or not self.models.finetuned:
            raise ValueError("[models] needs both `base` and `finetuned`")
        if not self.pretraining.path or not self.finetuning.path:
            raise ValueError("[pretraining] and [finetuning] each need a `path`")
        if "{instruction}" not in self.template:
            raise ValueError("template must contain {instruction}")
        if self.influence.alpha <= 0:
            raise ValueError("influence.alpha must be > 0")


def format_prompt(config: StudyConfig, instruction: str, context: str = "") -> str:
    """The fine-tuned model's prompt for an instruction (and optional context)."""
    if context.strip():
        return config.context_template.format(instruction=instruction.strip(), context=context.strip())
    return config.template.format(instruction=instruction.strip())


def _build(cls, data: dict[str, Any], where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"unknown key(s) in [{where}]: {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(known)}")
    defaults = cls()
    kwargs = {}
    for name, value in data.items():
        sub = getattr(defaults, name)
        if is_dataclass(sub):
            if not isinstance(value, dict):
                raise ValueError(f"[{where}].{name} must be a table")
            value = _build(type(sub), value, name)
        kwargs[name] = value
    return cls(**kwargs)

"""The study config schema: every knob of a study, read from TOML and saved in its manifest,
with the one prompt template (databricks/dolly-v2's) that formats every instruction."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..factors import FactorArguments
from ..influence import ScoreArguments, layer_damping
from ..methods import FACTOR_PRECISIONS, MULTI_STAGE
from ..projection import Whitening
from ..storage import VECTOR_DTYPES
from ..text import encode_prompt_answer
from ..tracking import find_tracked_layers
from .index import IndexSettings

DOLLY_INTRO = ("Below is an instruction that describes a task. Write a response that "
               "appropriately completes the request.")


def dolly_template(intro: str = DOLLY_INTRO, context: bool = False) -> str:
    """databricks/dolly-v2's instruction template (``instruct_pipeline.py``) with ``{instruction}``
    (and ``{context}``) to fill; it ends right before the response. ``intro=""`` leaves the blurb
    out, so the prompt starts at ``### Instruction:``."""
    parts = [intro] if intro else []
    parts.append("### Instruction:\n{instruction}")
    if context:
        parts.append("Input:\n{context}")
    parts.append("### Response:\n")
    return "\n\n".join(parts)


@dataclass(frozen=True)
class PromptTemplate:
    """How an instruction (and optional context) becomes the fine-tuned model's prompt, and how a
    fine-tuning record becomes a (prompt, scored answer) pair as in training."""

    template: str = dolly_template()
    context_template: str = dolly_template(context=True)
    response_suffix: str = ""  # appended to responses, as in training (e.g. EOS)

    @classmethod
    def dolly(cls, intro: str = DOLLY_INTRO, response_suffix: str = "") -> PromptTemplate:
        return cls(dolly_template(intro), dolly_template(intro, context=True), response_suffix)

    def prompt(self, instruction: str, context: str = "") -> str:
        """The prompt, ending right before the response; the response's tokens follow its final
        newline, tokenized separately (as :meth:`record_batches` and the query loss do)."""
        if context.strip():
            return self.context_template.format(instruction=instruction.strip(), context=context.strip())
        return self.template.format(instruction=instruction.strip())

    def record_batches(self, tokenizer, records: Iterable[Mapping[str, str]], max_length: int,
                       batch_size: int) -> Iterator[dict]:
        """Batches of records (instruction, context, response) scored on response tokens + suffix."""
        rows = list(records)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            prompts = [self.prompt(r["instruction"], r.get("context") or "") for r in chunk]
            answers = [r["response"] + self.response_suffix for r in chunk]
            yield encode_prompt_answer(tokenizer, prompts, answers, max_length)


@dataclass
class ModelsConfig:
    base: str = ""  # theta_pt: a Hugging Face id, a local save_pretrained directory, or a study path
    finetuned: str = ""  # theta_ft
    tokenizer: str = ""  # default: the fine-tuned model's
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def locations(self) -> dict[str, str]:
        """Where each part is loaded from, by role (the identity recorded with the factors)."""
        return {"base": self.base, "finetuned": self.finetuned, "tokenizer": self.tokenizer or self.finetuned}


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
    more: list[str] = field(default_factory=list)  # more document files, appended in order (e.g. a haystack)


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
    index: str = "auto"  # flat (exhaustive scan) | ivf (staged: faiss inverted lists, re-rank) | auto: by corpus size
    # ivf knobs: their defaults are the index's own (engine.study.index.IndexSettings, which says why)
    index_dims: int = IndexSettings.dims  # principal coordinates of every document in the coarse stage
    rerank: int = IndexSettings.rerank  # candidates per sign re-scored with their full rows
    index_sample: int = IndexSettings.sample  # documents the lists' centroids are trained on
    index_queries: int = IndexSettings.queries  # fine-tuning records whose queries the coarse basis is fit on
    # coarse coordinates sketching what the basis leaves out (0: none; unset: 2,048 up to 250k documents, none above)
    index_sketch: int | None = IndexSettings.sketch
    # per sign: retrieved by the index, re-scored exactly, best top_k shown. 75 served the same MRR@10 as 150 on
    # the 32k haystacks and the plain demos but one (-0.012), and pays for the larger re-rank
    candidates: int = 75
    seed: int = 0
    accumulation: str = "float32"  # precision of the factor fit's running sums: float32 | float64
    keep_covariances: bool = False  # store A and S beside their eigendecompositions (twice the files)
    vector_dtype: str = "float16"  # stored document vectors: float16 | bfloat16 | float32 | int8 | int4
    # Both factor sets as the explorer and the index stage hold them (stored float32; preconditioning
    # computes in float32 a layer at a time): bfloat16 halves them, which the paper's case needs to
    # fit an 80 GB GPU (docs/serving_precision.md measures what it costs in scores)
    factor_precision: str = "float32"  # float32 | bfloat16 | float16

    def tracked_layers(self, model) -> list:
        return find_tracked_layers(model, include=self.include or None, exclude=self.exclude or None)

    def factor_arguments(self, progress: bool = True, **overrides) -> FactorArguments:
        """The fit_factors settings of this study (``overrides`` for variants)."""
        settings = dict(strategy=self.strategy, seed=self.seed, label_samples=self.label_samples,
                        progress=progress, accumulation=self.accumulation, covariances=self.keep_covariances)
        return FactorArguments(**{**settings, **overrides})

    def score_arguments(self, method: str) -> ScoreArguments:
        return ScoreArguments(method=method, alpha=self.alpha, damping=self.damping,
                              damping_factor=self.damping_factor)

    def index_settings(self) -> IndexSettings:
        return IndexSettings(self.index, self.index_dims, self.rerank, self.index_sample, self.seed,
                             queries=self.index_queries, sketch=self.index_sketch)

    def whitening(self, pt_factors) -> Whitening:
        """The pretraining-side half-inverse with the damping multi-stage scoring uses."""
        args = self.score_arguments(MULTI_STAGE)
        return Whitening(pt_factors, lambda layer: layer_damping(pt_factors.strategy, layer, args), keep=self.eigen_dim)


@dataclass
class StudyConfig:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    pretraining: DatasetConfig = field(default_factory=DatasetConfig)
    finetuning: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    template: str = PromptTemplate.template
    context_template: str = PromptTemplate.context_template
    response_suffix: str = ""  # appended to responses when fitting H_ft, as in training (e.g. EOS)

    @property
    def prompts(self) -> PromptTemplate:
        return PromptTemplate(self.template, self.context_template, self.response_suffix)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyConfig:
        return _build(cls, data, "config")

    @classmethod
    def from_toml(cls, path: str | Path) -> StudyConfig:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} {'is not a file' if path.exists() else 'does not exist'}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path} is not valid TOML: {err}") from None
        config = cls.from_dict(data).with_local_paths_absolute()
        config.validate()
        return config

    def with_local_paths_absolute(self) -> StudyConfig:
        """Model and data locations that name local paths (relative to the working directory, as
        when the config was written) made absolute, so that the study they build opens from any
        directory; hub ids and missing paths are kept as written."""
        def absolute(location: str) -> str:
            return str(Path(location).resolve()) if location and Path(location).exists() else location

        m, pt, ft = self.models, self.pretraining, self.finetuning
        return replace(
            self, models=replace(m, base=absolute(m.base), finetuned=absolute(m.finetuned),
                                 tokenizer=absolute(m.tokenizer)),
            pretraining=replace(pt, path=absolute(pt.path), more=[absolute(p) for p in pt.more]),
            finetuning=replace(ft, path=absolute(ft.path)))

    def validate(self) -> None:
        if not self.models.base or not self.models.finetuned:
            raise ValueError("[models] needs both `base` and `finetuned`")
        if not self.pretraining.path or not self.finetuning.path:
            raise ValueError("[pretraining] and [finetuning] each need a `path`")
        if "{instruction}" not in self.template:
            raise ValueError("template must contain {instruction}")
        if self.influence.alpha <= 0:
            raise ValueError("influence.alpha must be > 0")
        if self.influence.vector_dtype not in VECTOR_DTYPES:
            raise ValueError(f"influence.vector_dtype must be one of {', '.join(VECTOR_DTYPES)}")
        if self.influence.factor_precision not in FACTOR_PRECISIONS:
            raise ValueError(f"influence.factor_precision must be one of {', '.join(FACTOR_PRECISIONS)}")
        inf = self.influence
        for name, low in (("max_length", 2), ("batch_size", 1), ("label_samples", 1), ("factor_documents", 0),
                          ("projection_dim", 1), ("eigen_dim", 1), ("index_dims", 1), ("rerank", 1),
                          ("index_sample", 1), ("index_queries", 1), ("candidates", 1)):
            if getattr(inf, name) < low:
                raise ValueError(f"influence.{name} must be at least {low}, got {getattr(inf, name)}")
        if inf.damping_factor <= 0 or (inf.damping is not None and inf.damping <= 0):
            raise ValueError("influence.damping and influence.damping_factor must be > 0")
        self.influence.factor_arguments(progress=False)  # checks accumulation and the rest
        self.influence.index_settings()  # checks the index knobs


def _build(cls, data: dict[str, Any], where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"unknown key(s) in [{where}]: {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(known)}")
    defaults, hints = cls(), get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = getattr(defaults, name)
        if is_dataclass(sub):
            if not isinstance(value, dict):
                raise ValueError(f"[{where}].{name} must be a table")
            value = _build(type(sub), value, name)
        else:
            value = _typed(value, hints[name], f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def _typed(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the field's type (an int where a float goes), or a message naming the field."""
    options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if get_origin(option) is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    wanted = " or ".join("a list of strings" if get_origin(o) is list else
                         {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
                          type(None): "left out"}.get(o, str(o)) for o in options)
    raise ValueError(f"{where} must be {wanted}, got {value!r}")

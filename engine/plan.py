"""How much memory, disk and time a study takes, per stage, before anything runs (`msif plan`).

The model is read from its config alone (``AutoConfig``, built on torch's meta device: no weights),
so the tracked layers and their shapes are exact. Memory per stage is the sum of what the code
holds at its peak, in bytes:

- the model's weights;
- one batch's forward + backward capture, measured on Pythia-shaped models (see
  ``benchmarks/memory_plan.py``): the LM head's logits, a 16 MiB chunk at a time where the head is
  fused with the loss (``engine.tasks``; else ``2.9 tokens V x 4``: logits and their float32 copies,
  the loss, its gradient, sampled labels) ``+ 20.5 tokens h blocks x w`` (activations autograd saves,
  ``w`` bytes per weight), or, if larger, the captured ``a`` and ``g`` of every tracked layer in
  float32 together with the layers' raw inputs;
- the factor fit's running sums ``sum (in^2 + out^2)`` (covariance pass) or its eigenbases plus
  ``sum out in`` sums (correction pass), and the largest layer's per-sequence work;
- for the projection stage, the gathered eigenvector columns of the kept coordinates;
- for serving, both models and both factor sets (in ``factor_precision``).

Times are compute estimates (FLOPs over an assumed sustained rate), to be read as an order of
magnitude; memory is the number the plan is checked on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .storage import vector_bytes

SHARD_ROWS = 1024  # documents per vector shard (precompute.pipeline.SHARD_SIZE)
GIB = 2**30
LOGIT_COPIES = 2.9  # float32 copies of the logits at a capture's peak (measured)
SAVED_PER_HIDDEN = 20.5  # hidden-sized activations saved per token and block (measured)
PROCESS_BASE = 0.5 * GIB  # a CPU process with torch, transformers, datasets and the corpus mapped
EFFICIENCY = 0.4  # sustained fraction of a device's peak FLOP rate
DEVICES = {  # FLOP/s: 16-bit dense peak, float32 peak, float64 eigendecomposition (syevd); memory
    "h200": (989e12, 67e12, 1e12, 141e9),
    "h100": (989e12, 67e12, 1e12, 80e9),
    "a100": (312e12, 19.5e12, 0.5e12, 80e9),
}


def measured_rates() -> tuple[float, float, float]:
    """This CPU's rates, from a float32 matmul and a float64 eigendecomposition (about 0.3 s)."""
    import time

    import torch

    x = torch.randn(1024, 1024)
    started = time.perf_counter()
    for _ in range(4):
        x @ x
    matmul = 4 * 2 * 1024**3 / (time.perf_counter() - started)
    a = torch.randn(512, 512, dtype=torch.float64)
    a = a @ a.T
    started = time.perf_counter()
    torch.linalg.eigh(a)
    eig = 9 * 512**3 / (time.perf_counter() - started)
    return matmul / EFFICIENCY, matmul / EFFICIENCY, eig


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a model: sizes and the tracked layers' (out, in[+1])."""

    name: str
    parameters: int
    hidden: int
    blocks: int
    vocab: int
    layers: tuple[tuple[int, int], ...]
    fused_head: bool = False  # the LM head's loss is fused in captures (engine.tasks): no logits tensor

    @classmethod
    def of(cls, location: str, include=None, exclude=None) -> Shape:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from .tracking import find_tracked_layers

        config = AutoConfig.from_pretrained(location)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        from .tasks import FUSED_HEAD_TYPES

        tracked = find_tracked_layers(model, include=include or None, exclude=exclude or None)
        head = model.get_output_embeddings()
        fused = config.model_type in FUSED_HEAD_TYPES and all(layer.module is not head for layer in tracked)
        return cls(location, sum(p.numel() for p in model.parameters()), config.hidden_size,
                   config.num_hidden_layers, config.vocab_size,
                   tuple(layer.gradient_shape for layer in tracked), fused)

    @property
    def eigenbasis_numbers(self) -> int:
        """Entries of every Q_A and Q_S (and of the covariance sums)."""
        return sum(i * i + o * o for o, i in self.layers)

    @property
    def gradient_numbers(self) -> int:
        """Entries of every G (tracked parameters): Lambda, or its sums."""
        return sum(o * i for o, i in self.layers)

    @property
    def capture_numbers(self) -> int:
        """Per token: every tracked layer's a and g."""
        return sum(o + i for o, i in self.layers)

    @property
    def input_numbers(self) -> int:
        return sum(i - 1 for _, i in self.layers)


@dataclass
class StagePlan:
    name: str
    device_bytes: float  # peak on the compute device (the host itself on a CPU plan)
    host_bytes: float  # peak in host memory
    disk_bytes: float  # what the stage writes
    seconds: float  # compute estimate
    parts: dict[str, float] = field(default_factory=dict)  # what the peak is made of


@dataclass
class Plan:
    device: str
    gpus: int
    device_memory: float  # bytes per device (the host's on a CPU plan)
    stages: list[StagePlan]
    documents: int = 0
    records: int = 0
    vectors: str = ""  # what one document's stored vectors take, in words

    def fits(self, stage: StagePlan) -> bool:
        """Within 90% of a device's memory (the host's, on a CPU plan)."""
        return stage.device_bytes <= 0.9 * self.device_memory


@dataclass(frozen=True)
class Job:
    """The settings every stage estimate uses."""

    shape: Shape
    tokens: int  # per batch: batch_size x max_length
    batch: int
    weight_bytes: int
    accumulation_bytes: int
    label_samples: int
    eigen_dim: int
    projection_dim: int
    vector_dtype: str  # how document vectors are stored (engine.storage.VECTOR_DTYPES)
    rates: tuple[float, float, float]
    base: float  # process memory before the stage (CPU plans only)
    gpus: int

    @property
    def weights(self) -> float:
        return self.shape.parameters * self.weight_bytes

    @property
    def kept(self) -> list[int]:
        """Whitened coordinates kept per tracked layer."""
        return [min(self.eigen_dim, o * i) for o, i in self.shape.layers]

    @property
    def dims(self) -> tuple[int, int]:
        """(whitened, raw) vector lengths of a document."""
        return sum(self.kept), self.projection_dim * len(self.shape.layers)

    @property
    def flops_per_token(self) -> float:
        """A capture: forward (2P) and backward to the layer outputs (about 2P), and the LM head."""
        return 4 * self.shape.parameters + 2 * self.shape.hidden * self.shape.vocab


def capture_bytes(job: Job) -> float:
    """One batch's forward + backward capture at its peak (working memory only)."""
    shape = job.shape
    if shape.fused_head:  # a few rows of logits at a time (and their CDF when sampling), in float32
        from .tasks import HEAD_CHUNK_ELEMENTS

        logits = 2 * HEAD_CHUNK_ELEMENTS * 4 + job.tokens * shape.hidden * 4 * 2
    else:
        logits = job.tokens * LOGIT_COPIES * shape.vocab * 4
    backward = logits + job.tokens * SAVED_PER_HIDDEN * shape.hidden * shape.blocks * job.weight_bytes
    captured = job.tokens * (shape.capture_numbers * 4 + shape.input_numbers * job.weight_bytes)
    return max(backward, captured)


def held_bytes(job: Job) -> float:
    """The captured a and g in float32, held while statistics are computed from them."""
    return job.tokens * job.shape.capture_numbers * 4


def factor_stage(name: str, job: Job, batches: int) -> StagePlan:
    """A factor fit: covariance pass, float64 eigendecompositions, correction pass, writing."""
    shape = job.shape
    sums = shape.eigenbasis_numbers * job.accumulation_bytes
    per_layer = max(job.tokens * (o + i) * 4 + 2 * job.batch * o * i * 4 for o, i in shape.layers)
    eig = max(max(i, o) ** 2 for o, i in shape.layers) * 8 * 3  # one layer in float64, with workspace
    phases = {"covariance pass": sums + capture_bytes(job), "eigendecomposition": sums + eig,
              "correction pass": shape.eigenbasis_numbers * 4 + shape.gradient_numbers * job.accumulation_bytes
              + max(capture_bytes(job), held_bytes(job) + per_layer)}
    peak = max(phases, key=phases.get)
    tokens = job.tokens * batches * job.label_samples  # this device's share
    fit_flops = 4 * shape.eigenbasis_numbers + 2 * shape.gradient_numbers  # per token, both passes
    eig_flops = sum(9 * (i ** 3 + o ** 3) for o, i in shape.layers) / job.gpus
    seconds = (2 * tokens * job.flops_per_token / (job.rates[0] * EFFICIENCY)
               + tokens * fit_flops / (job.rates[1] * EFFICIENCY) + eig_flops / job.rates[2])
    disk = (shape.eigenbasis_numbers + shape.gradient_numbers) * 4
    return StagePlan(name, job.base + job.weights + phases[peak], job.base + job.weights, disk, seconds,
                     {"weights": job.weights, peak: phases[peak], "base": job.base})


def kept_columns(job: Job) -> float:
    """The pretraining eigenvectors' columns of the kept whitened coordinates in float32, worst case
    (the projection gathers documents' coordinates with them; the explorer, its queries')."""
    return sum((o * min(k, o) + i * min(k, i)) * 4 for (o, i), k in zip(job.shape.layers, job.kept))


def projection_stage(job: Job, documents: int) -> StagePlan:
    """Projected and whitened vectors of every document (norms too); worst case for the gather."""
    shape = job.shape
    kept = job.kept
    columns = kept_columns(job)
    per_layer = max(2 * job.batch * o * i * 4 for o, i in shape.layers)  # norms, where forming G is cheaper
    device = job.base + job.weights + columns + max(capture_bytes(job), held_bytes(job) + per_layer)
    gather = sum(2 * (o * min(k, o) + i * min(k, i)) for (o, i), k in zip(shape.layers, kept))
    tokens = documents * job.tokens / job.batch / job.gpus
    seconds = tokens * (job.flops_per_token / (job.rates[0] * EFFICIENCY) + gather / (job.rates[1] * EFFICIENCY))
    return StagePlan("projection", device, job.base + job.weights, documents * document_bytes(job),
                     seconds, {"weights": job.weights, "kept eigenvector columns": columns, "base": job.base})


def document_bytes(job: Job) -> int:
    """What one document's stored vectors take: whitened and projected rows, and its squared norm."""
    whitened, projected = job.dims
    return vector_bytes(whitened, job.vector_dtype) + vector_bytes(projected, job.vector_dtype) + 8


def index_stage(inf, documents: int, dims: tuple[int, int], cpu: bool, queries: float) -> StagePlan:
    """The search index (engine.study.index): a flat index writes nothing and reads a shard at a time;
    an ivf index first makes the query vectors its basis is fit on (``queries``: the fine-tuned model,
    both factor sets and a batch's capture on the device, freed after), then holds a document sample
    (float32) and writes (documents, index_dims + index_sketch) float32 coordinates of the whitened vectors into
    inverted lists on disk, memory-mapped when served, and the default ranking's code scan (4 bits a
    coordinate, held in memory when served)."""
    kind = inf.index_settings().resolved(documents)
    if kind == "flat":
        shard = min(documents, SHARD_ROWS) * dims[0] * 4
        return StagePlan("index", PROCESS_BASE + shard if cpu else 0.0, PROCESS_BASE + shard, 0.0, 0.0,
                         {"one shard": shard})
    settings = inf.index_settings()
    # principal coordinates (no more than the rows have), then the residual's sketch
    coarse = min(settings.dims, dims[0]) + settings.sketch_size(documents)
    sample = min(documents, settings.basis_sample(settings.queries, dims[0])) * dims[0] * 4
    training = settings.training_documents(documents) * coarse * 4
    lists = documents * coarse * 4
    codes = documents * coarse / 2  # the code scan: encoded as the lists fill, written at the end
    peak = PROCESS_BASE + max(2 * sample, training + min(documents, SHARD_ROWS) * dims[0] * 4) + codes
    return StagePlan("index", max(peak, queries) if cpu else queries, peak, lists + codes, 0.0,
                     {"record queries (model, both factor sets)": queries, "document sample": sample,
                      "centroid training coordinates": training, "inverted lists": lists,
                      "code scan (default ranking)": codes})


def plan_study(config, device: str = "h200", gpus: int = 1, device_memory: float | None = None,
               documents: int | None = None, records: int | None = None, model_config: str | None = None) -> Plan:
    """Every stage of ``config``'s study on ``gpus`` devices of kind ``device`` (a key of
    ``DEVICES``, or "cpu" for this machine, whose memory is the host's)."""
    inf, models = config.influence, config.models
    shape = Shape.of(model_config or models.base, inf.include, inf.exclude)
    documents = documents or config.pretraining.limit or 100_000  # assumed when neither says
    records = records or config.finetuning.limit or 15_000
    cpu = device == "cpu"
    job = Job(shape, inf.batch_size * inf.max_length, inf.batch_size,
              4 if cpu or models.dtype == "float32" else 2, 8 if inf.accumulation == "float64" else 4,
              inf.label_samples, inf.eigen_dim, inf.projection_dim, inf.vector_dtype,
              measured_rates() if cpu else DEVICES[device][:3], PROCESS_BASE if cpu else 0.0, gpus)
    factor_docs = min(documents, inf.factor_documents or documents)
    stages = [factor_stage("factors-pretrained", job, math.ceil(factor_docs / inf.batch_size / gpus)),
              factor_stage("factors-finetuned", job, math.ceil(records / inf.batch_size / gpus)),
              projection_stage(job, documents)]
    held = 4 if inf.factor_precision == "float32" else 2  # both factor sets as served (and indexed)
    factors = 2 * (shape.eigenbasis_numbers + shape.gradient_numbers) * held
    columns = kept_columns(job)  # the whitening of queries
    stages.append(index_stage(inf, documents, job.dims, cpu,
                              job.base + job.weights + factors + columns + capture_bytes(job)))
    index_files = stages[-1].disk_bytes
    serve = job.base + 2 * job.weights + factors + columns + capture_bytes(job) + (index_files if cpu else 0.0)
    stages.append(StagePlan("serve (explorer)", serve, PROCESS_BASE + index_files, 0.0, 0.0,
                            {f"both factor sets ({inf.factor_precision})": factors, "both models": 2 * job.weights,
                             "kept eigenvector columns": columns, "one batch's capture": capture_bytes(job),
                             "indexes": index_files}))
    if device_memory is None:
        device_memory = _host_memory() if cpu else DEVICES[device][3]
    whitened, projected = job.dims
    vectors = (f"document vectors: {document_bytes(job) / 1024:,.1f} KiB each ({whitened:,} whitened + {projected:,} "
               f"projected numbers in {inf.vector_dtype}, and the squared norm)")
    return Plan(device, gpus, device_memory, stages, documents, records, vectors)


def plan_here(config, gpus: int = 1) -> Plan:
    """The plan for the device this machine would run ``config`` on (its memory, as detected)."""
    import torch

    from .models import resolve_device

    if resolve_device(config.models.device).type != "cuda":
        return plan_study(config, device="cpu")
    name = torch.cuda.get_device_name(0).lower()
    kind = next((k for k in ("h200", "h100", "a100") if k in name), "h100")
    return plan_study(config, device=kind, gpus=gpus, device_memory=torch.cuda.get_device_properties(0).total_memory)


def _host_memory() -> float:
    import os

    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def advice(plan: Plan, config) -> list[str]:
    """For each stage that does not fit, the settings that would make it fit."""
    inf = config.influence
    lines = []
    for stage in plan.stages:
        if plan.fits(stage):
            continue
        over = stage.device_bytes - 0.9 * plan.device_memory
        hint = [f"{stage.name} needs {stage.device_bytes / GIB:,.1f} GiB, {over / GIB:,.1f} GiB over"]
        if stage.name.startswith("factors") or stage.name == "projection":
            hint.append(f"lower batch_size (now {inf.batch_size}) or max_length; track fewer layers "
                        "(include/exclude, e.g. the MLP layers only)")
            if inf.accumulation == "float64":
                hint.append("accumulation = \"float32\" halves the running sums")
        if stage.name == "projection":
            hint.append(f"a smaller eigen_dim (now {inf.eigen_dim}) gathers fewer eigenvector columns")
        if stage.name.startswith("serve") or stage.name == "index":
            if inf.factor_precision == "float32":
                hint.append('factor_precision = "bfloat16" holds both factor sets in half the memory '
                            "(docs/serving_precision.md)")
            hint.append("serve on a larger device: both factor sets stay on the device for queries")
        if stage.name == "index":
            hint.append(f"a smaller index_sample (now {inf.index_sample}) or batch_size (the record queries "
                        "the basis is fit on are made a batch at a time)")
        lines.append("; ".join(hint))
    return lines


def report(plan: Plan, config) -> str:
    """The plan as a table with a verdict line."""
    where = (f"this machine's CPU ({plan.device_memory / GIB:,.0f} GiB of host memory)" if plan.device == "cpu"
             else f"{plan.gpus} x {plan.device} ({plan.device_memory / GIB:,.0f} GiB each)")
    lines = [f"plan for {config.models.base} -> {config.models.finetuned} on {where}",
             f"{plan.documents:,} pretraining documents, {plan.records:,} fine-tuning records", "",
             f"{'stage':<20}{'device GiB':>12}{'host GiB':>10}{'disk GiB':>10}{'time':>10}  verdict",
             "-" * 72]
    for s in plan.stages:
        verdict = "fits" if plan.fits(s) else "DOES NOT FIT"
        lines.append(f"{s.name:<20}{s.device_bytes / GIB:>12,.1f}{s.host_bytes / GIB:>10,.1f}"
                     f"{s.disk_bytes / GIB:>10,.1f}{_duration(s.seconds):>10}  {verdict}")
    lines += ([plan.vectors] if plan.vectors else []) + [""] + (advice(plan, config) or ["every stage fits"])
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"

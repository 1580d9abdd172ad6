"""Where everything lives in a study directory: one table of paths, the stages that write them,
and which stages a reader needs. Nothing else in the project spells a study path or a stage name.

No torch here, so that a command line can name paths and stages without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMAT = "msif-study"
FORMAT_VERSION = 3  # 2: factors as per-layer directories, document vectors in memory-mappable shards;
# 3: a staged search index (principal coordinates + full rows from the shards) instead of three faiss files
DEFAULT_STUDY = "studies/demo"  # where `msif app` and the benchmarks look for the demo study


class Stage:
    """Stage names as the manifest records them, in build order."""

    # the demo world (`build-demo` only)
    WORLD = "world"
    TOKENIZER = "tokenizer"
    PRETRAIN = "pretrain"
    FINETUNE = "finetune"
    QA_EVAL = "qa-eval"
    HAYSTACK = "haystack"
    # every study (`precompute`, and `build-demo` after the stages above)
    CORPUS = "corpus"
    FINETUNE_DATA = "finetune-data"
    FACTORS_PRETRAINED = "factors-pretrained"
    FACTORS_FINETUNED = "factors-finetuned"
    PROJECTION = "projection"
    INDEX = "index"


DEMO_STAGES = (Stage.WORLD, Stage.TOKENIZER, Stage.PRETRAIN, Stage.FINETUNE, Stage.QA_EVAL, Stage.HAYSTACK)
PIPELINE_STAGES = (Stage.CORPUS, Stage.FINETUNE_DATA, Stage.FACTORS_PRETRAINED,
                   Stage.FACTORS_FINETUNED, Stage.PROJECTION, Stage.INDEX)
READER_STAGES = PIPELINE_STAGES  # what opening a study for queries needs


@dataclass(frozen=True)
class Artifact:
    """One file or directory of a study."""

    path: str  # relative to the study root
    stage: str  # the stage that writes it ("" for the manifest, which every stage updates)
    holds: str

    def __str__(self) -> str:
        return self.path


MANIFEST = Artifact("manifest.json", "", "format, software versions, config, stages done with "
                    "their settings, sha256 and size of every file")
# the demo world
WORLD_DIR = Artifact("world", Stage.WORLD, "the generated world (the four files below)")
WORLD_DOCUMENTS = Artifact("world/documents.jsonl", Stage.WORLD, "pretraining documents as generated")
WORLD_RECORDS = Artifact("world/finetune.jsonl", Stage.WORLD, "dolly-format fine-tuning records")
FACTS = Artifact("world/facts.jsonl", Stage.WORLD,
                 "facts: question, answer, source doc_ids, split (finetune | pretrain_only)")
WORLD_INFO = Artifact("world/world.json", Stage.WORLD, "seed, world settings and statistics")
TOKENIZER_DIR = Artifact("tokenizer", Stage.TOKENIZER, "the demo's BPE tokenizer (save_pretrained)")
PRETRAINED_DIR = Artifact("models/pretrained", Stage.PRETRAIN, "theta_pt (save_pretrained)")
FINETUNED_DIR = Artifact("models/finetuned", Stage.FINETUNE, "theta_ft (save_pretrained)")
QA_REPORT = Artifact("world/qa_eval.json", Stage.QA_EVAL,
                     "how well theta_ft answers questions, per split, with every response")
DEMO_PROMPTS = Artifact("world/demo_prompts.jsonl", Stage.QA_EVAL,
                        "pretraining-only questions theta_ft answers correctly")
HAYSTACK = Artifact("world/haystack.parquet", Stage.HAYSTACK,
                    "generated distractor documents added after training (`--extra-documents`): "
                    "title, text, kind; none names a world entity")
# every study
DOCUMENTS = Artifact("corpus/documents.parquet", Stage.CORPUS,
                     "pretraining documents: doc_id, title, text")
RECORDS = Artifact("finetune/records.parquet", Stage.FINETUNE_DATA,
                   "fine-tuning records: record_id, instruction, context, response, category")
PT_FACTORS = Artifact("factors/pretrained", Stage.FACTORS_PRETRAINED,
                      "curvature factors of theta_pt on pretraining text: index.json, one file per layer")
FT_FACTORS = Artifact("factors/finetuned", Stage.FACTORS_FINETUNED,
                      "curvature factors of theta_ft on the records' response tokens (the same form)")
PROJECTOR = Artifact("gradients/projector.safetensors", Stage.PROJECTION,
                     "the Kronecker random projection (seed, layout, matrices)")
SHARDS = Artifact("gradients/shards", Stage.PROJECTION,
                  "pretraining documents at theta_pt, 1,024 a shard (the three files below), and "
                  "stamp.json (the settings they were made with)")
PROJECTED = Artifact("gradients/shards/*/projected.npy", Stage.PROJECTION,
                     "(shard documents, D) projected raw gradients / their exact norm, in vector_dtype (stored, "
                     "no longer searched)")
WHITENED = Artifact("gradients/shards/*/whitened.npy", Stage.PROJECTION,
                    "(shard documents, D') whitened top eigen-coordinates, in vector_dtype (int8, int4: codes, "
                    "then the row's float32 scales); every indexed method searches them")
SQ_NORMS = Artifact("gradients/shards/*/sq_norms.npy", Stage.PROJECTION,
                    "(shard documents,) float64 exact squared gradient norms")
SHARD_TEXTS = Artifact("gradients/shards/*/texts.sha256", Stage.PROJECTION,
                       "digest of the shard's document texts: a grown or edited corpus recomputes only "
                       "the shards whose texts changed")
INDEX_DIR = Artifact("index", Stage.INDEX, "the search index of the whitened vectors: their norms; for a staged "
                     "(ivf) index also the basis and the inverted lists below")
INDEX_NORMS = Artifact("index/whitened-norms.npy", Stage.INDEX,
                       "(documents,) float32 norm of each whitened row: the index's estimate of a document's "
                       "norm in the (H_pt + lambda I)^-1 metric, for normalised multi-stage rankings")
INDEX_SCAN = Artifact("index/*-scan.faiss", Stage.INDEX,
                      "every document's principal coordinates times the default ranking's weights, product-"
                      "quantised (faiss IndexPQFastScan, 4 bits a coordinate): that ranking's coarse stage")
INDEX_IVF = Artifact("index/*-ivf", Stage.INDEX,
                     "a faiss inverted file of every document's principal coordinates (index.faiss: the trained "
                     "lists; lists.ivfdata: the rows, on disk and memory-mapped)")
INDEX_BASIS = Artifact("index/*-basis.safetensors", Stage.INDEX,
                       "their mean and principal directions, fit on a sample of the vectors scaled to unit norm")

LAYOUT = (MANIFEST, WORLD_DIR, WORLD_DOCUMENTS, WORLD_RECORDS, FACTS, WORLD_INFO, TOKENIZER_DIR,
          PRETRAINED_DIR, FINETUNED_DIR, QA_REPORT, DEMO_PROMPTS, HAYSTACK, DOCUMENTS, RECORDS, PT_FACTORS,
          FT_FACTORS, PROJECTOR, SHARDS, PROJECTED, WHITENED, SQ_NORMS, SHARD_TEXTS, INDEX_DIR, INDEX_NORMS, INDEX_SCAN,
          INDEX_IVF, INDEX_BASIS)
SHARD_KINDS = {"projected": PROJECTED, "whitened": WHITENED, "sq_norms": SQ_NORMS}


def shard(index: int) -> str:
    """The directory of document shard ``index`` (its files: ``SHARD_KINDS``)."""
    return f"{SHARDS.path}/shard-{index:05d}"


def shard_file(index: int, kind: str) -> str:
    return f"{shard(index)}/{kind}.npy"


def shard_digest_file(index: int) -> str:
    return f"{shard(index)}/texts.sha256"


def index_file(kind: str, part: str) -> str:
    """``index/{kind}-ivf`` (a directory), ``index/{kind}-scan.faiss`` (the default ranking's code scan)
    or ``index/{kind}-basis.safetensors`` (kind: whitened)."""
    names = {"ivf": f"{kind}-ivf", "scan": f"{kind}-scan.faiss", "basis": f"{kind}-basis.safetensors"}
    return f"{INDEX_DIR.path}/{names[part]}"


def describe() -> str:
    """The layout as text, one artifact a line (for docs and ``--help``)."""
    width = max(len(a.path) for a in LAYOUT)
    return "\n".join(f"{a.path:<{width}}  {a.stage or '-':<18}  {a.holds}" for a in LAYOUT)

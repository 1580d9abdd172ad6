"""What a study holds, for the Study page: models, corpus, fine-tuning data, curvature spectra."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from engine import damping_values
from engine.methods import MULTI_STAGE
from engine.study import OpenedStudy, StageModel


@dataclass
class ModelSummary:
    path: str
    model_class: str
    parameters: int
    tracked_layers: int
    tracked_parameters: int
    weights_sha256: str  # the first 16 hex digits of the fingerprint the factors were fitted on
    factor_strategy: str
    factor_sequences: int
    factor_tokens: int


@dataclass
class StudySummary:
    root: str
    device: str
    models: dict[str, ModelSummary]  # "pretrained", "fine-tuned"
    documents: int
    records: int
    record_categories: dict[str, int]  # most common first
    indexed_documents: int
    search: dict[str, Any]  # the index stage's record: kind, settings, measured recall
    candidates_per_sign: int
    influence: dict[str, Any]  # the study's influence settings
    stages: dict[str, dict]  # as the manifest records them
    software: dict[str, str]

    def model_table(self) -> dict[str, dict[str, Any]]:
        return {stage: asdict(m) for stage, m in self.models.items()}

    def search_text(self) -> str:
        """The index in words: what it is and how well it was measured to find the best documents."""
        s = self.search
        if s["kind"] == "flat":
            text = (f"Exhaustive scan of all {self.indexed_documents:,} documents' stored vectors (exact "
                    "for those vectors)")
        else:
            lists = s.get("whitened", {})
            sketch = (f" and {lists['sketch']:,} coordinates of a count sketch of what that basis leaves out"
                      if lists.get("sketch") else "")
            text = (f"Staged search: every document's {s['dims']} coordinates in a basis fit on "
                    f"{lists.get('queries', '?')} fine-tuning records' query vectors{sketch}, in a faiss inverted file "
                    f"of {lists.get('nlist', '?')} lists on disk, {lists.get('nprobe', '?')} of them visited per sign, "
                    f"plus the {s.get('band', 0):,} documents of largest weight times norm for the ranking, the best "
                    f"{s['rerank']:,} per sign re-scored with their full vectors")
            scan = lists.get("scan")
            if scan and lists.get("nprobe", 0) < lists.get("nlist", 0):
                text += (f"; the default ranking ({scan['ranking']}) comes from a code scan of every document "
                         f"instead ({scan['bytes_per_document']} bytes each): its best documents lie in many lists")
        text += f", then {self.candidates_per_sign} per sign re-scored exactly."
        for name, r in s.get("recall", {}).items():
            cosine = f", cosine ranking {r['cosine_at_10']:.3f}" if "cosine_at_10" in r else ""
            text += (f" Measured recall@10 against a full scan of the {name} vectors: {r['at_10']:.3f}{cosine} "
                     f"(recall@100 {r['at_100']:.3f}, {r['queries']} fine-tuning records as queries).")
        return text


class Spectrum(NamedTuple):
    ranks: np.ndarray  # 1-based, log-spaced
    values: np.ndarray  # eigenvalues at those ranks, largest first
    damping: float  # the lambda this layer uses


def _model_summary(stage: StageModel) -> ModelSummary:
    layers, factors = stage.layers, stage.factors
    return ModelSummary(
        stage.location, type(stage.model).__name__, sum(p.numel() for p in stage.model.parameters()),
        len(layers), sum(layer.out_features * (layer.in_features + layer.has_bias) for layer in layers),
        factors.model["weights_sha256"][:16], factors.strategy, factors.num_sequences, factors.num_tokens)


def summarize(study: OpenedStudy) -> StudySummary:
    config, manifest = study.config, study.manifest
    categories = Counter(c or "(none)" for c in study.records["category"])
    return StudySummary(
        str(study.root), str(study.device),
        {"pretrained": _model_summary(study.pretrained), "fine-tuned": _model_summary(study.finetuned)},
        len(study.documents), len(study.records), dict(categories.most_common()),
        study.vectors.documents, study.index.record, config.influence.candidates,
        asdict(config.influence), manifest.get("stages", {}), manifest.get("software", {}))


def spectra(study: OpenedStudy, points: int = 256) -> dict[str, dict[str, Spectrum]]:
    """Eigenvalues of both approximate Fishers, per stage and layer, largest first, with the
    damping lambda that layer uses."""
    args = study.config.influence.score_arguments(MULTI_STAGE)
    out = {}
    for stage, factors in (("pretrained", study.pretrained.factors), ("fine-tuned", study.finetuned.factors)):
        damping = damping_values(factors, args)
        out[stage] = {name: Spectrum(*factors.spectrum(name, points), damping[name]) for name in factors.layers}
    return out


def document_lengths(study: OpenedStudy, limit: int = 5000) -> np.ndarray:
    """Token counts of (up to ``limit``, evenly spaced) documents, before truncation."""
    docs = study.documents
    step = max(1, len(docs) // limit)
    texts = list(docs.select(range(0, len(docs), step))["text"])
    return np.array([len(ids) for ids in study.tokenizer(texts, add_special_tokens=False)["input_ids"]])


def largest_norms(study: OpenedStudy, count: int = 20) -> pd.DataFrame:
    """The documents with the largest gradient norms at theta_pt (and their whitened norms), the
    ones that dominate raw influence rankings; norms are also given as multiples of the median."""
    gradient, whitened = study.index.norms.astype(np.float64), study.index.whitened_norms.astype(np.float64)
    top = np.argsort(-gradient, kind="stable")[:count]
    rows = study.documents.select(top.tolist())
    return pd.DataFrame({
        "doc_id": top, "title": rows["title"],
        "gradient norm": gradient[top], "× median": gradient[top] / np.median(gradient),
        "whitened norm": whitened[top], "whitened × median": whitened[top] / np.median(whitened),
        "text": [" ".join(t.split())[:120] for t in rows["text"]],
    })

"""Shared tiny models and data. Everything is built locally; nothing touches a model hub."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from engine.tasks import IGNORE

VOCAB = 24


def tiny_neox(seed: int = 0, hidden: int = 8, layers: int = 2) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=2, intermediate_size=2 * hidden,
                           max_position_embeddings=64)
    return GPTNeoXForCausalLM(config).double().eval()


def lm_batch(n: int, length: int, seed: int, ragged: bool = True, prompt: int = 0) -> dict:
    """Random token batch, right-padded when ``ragged``; the first ``prompt`` tokens unscored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    if ragged:
        for i in range(n):
            mask[i, length - (i % 3):] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :prompt] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def pt_model():
    return tiny_neox(seed=0)


@pytest.fixture(scope="module")
def ft_model(pt_model):
    """A 'fine-tuned child': the parent's weights, moved."""
    child = copy.deepcopy(pt_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in child.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return child


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> Path:
    """A tiny demo study (seconds to build), built once through the CLI and shared read-only."""
    from precompute.cli import main

    out = tmp_path_factory.mktemp("tiny-demo") / "study"
    assert main(["build-demo", "--out", str(out), "--tiny", "--quiet", "--seed", "3"]) == 0
    return out

"""Loading models and tokenizers with transformers, on the device asked for."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA where there is a GPU, else the CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here")
    return device


def load_causal_lm(location: str, dtype: str, device: torch.device):
    """A causal language model (hub id or save_pretrained directory) in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(location, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def load_tokenizer(location: str):
    """The tokenizer, padding with EOS when it has no pad token (batches are right-padded)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quiet_libraries() -> None:
    """Our own progress bars say what is happening; the libraries' per-file bars are noise."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")  # weights, config, tokenizer


def model_files(location: str) -> list:
    """The files a model or tokenizer is loaded from (weights, config, vocabulary), for its
    identity: a directory's own files, or a hub id's files in the local cache; none when the
    location is not on this machine."""
    from pathlib import Path

    directory = Path(location)
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(location, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached here (or not a hub id): no file identity
            return []
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES)

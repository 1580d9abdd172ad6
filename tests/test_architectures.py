"""The engine on the three decoder families it has to support, with tiny models built from configs.

* GPT-NeoX (Pythia / dolly-v2): fused ``query_key_value``, biases everywhere.
* Llama: separate q/k/v/o and gated MLP, no biases, grouped key/value heads (k/v narrower than q).
* GPT-2: transformers' ``Conv1D`` layers, whose weights are stored transposed as (in, out),
  and an LM head tied to the token embedding.

For each: which layers are tracked (and include/exclude patterns), per-sequence gradients against
plain autograd (right-padded batches), factor statistics that ignore padding, and the whole
multi-stage path (save/reload models, fit, save/load and match factors, score three ways).
Nothing is downloaded: models come from small configs, the tokenizer is a character-level one
built in memory.
"""

from __future__ import annotations

import copy
import string

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import engine
from engine import (
    FactorArguments,
    FactorMismatchError,
    Factors,
    LanguageModelingTask,
    ScoreArguments,
    attribute_tokens,
    encode_documents,
    encode_prompt_answer,
    find_tracked_layers,
    fit_factors,
    precondition,
    score_documents,
    score_gradients,
    sequence_gradients,
    stack_gradients,
)

VOCAB, HIDDEN, LAYERS, MAX_LEN = 48, 16, 2, 60
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=1)


def _gpt_neox() -> torch.nn.Module:
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=32, rotary_pct=0.5, max_position_embeddings=MAX_LEN + 4,
        tie_word_embeddings=False, **SPECIAL))


def _llama() -> torch.nn.Module:
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=32, max_position_embeddings=MAX_LEN + 4,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, **SPECIAL))


def _gpt2() -> torch.nn.Module:
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_positions=MAX_LEN + 4, **SPECIAL))


# name -> (builder, block prefix, per-block tracked suffixes, the MLP ones among them, biases?)
ARCHITECTURES = {
    "gpt-neox": (_gpt_neox, "gpt_neox.layers",
                 ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
                 ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"], True),
    "llama": (_llama, "model.layers",
              ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
              ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], False),
    "gpt2": (_gpt2, "transformer.h",
             ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
             ["mlp.c_fc", "mlp.c_proj"], True),
}
ARCH_NAMES = list(ARCHITECTURES)

PRETRAINING = [
    "the capital of zarnia is vell.",
    "a cat sat on the mat, and the dog slept.",
    "vell is a small city by the sea.",
    "the river runs north to the old bridge!",
    "bob likes tea.",
    "in 1920 the bridge was built of stone and iron.",
    "zarnia exports salt, wool and tin.",
    "who reads? everyone reads.",
]
FINETUNING = [
    ("question: what is the capital of zarnia? answer:", " vell."),
    ("question: what does bob like? answer:", " tea."),
    ("question: what does zarnia export? answer:", " salt and wool."),
    ("question: when was the bridge built? answer:", " in 1920."),
]
QUERIES = [
    ("question: what is the capital of zarnia? answer:", " vell."),
    ("question: what is the bridge made of? answer:", " stone."),
]


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return ARCHITECTURES[arch][0]().eval()


def expected_names(arch: str, suffixes=None) -> set[str]:
    _, prefix, all_suffixes, _, _ = ARCHITECTURES[arch]
    return {f"{prefix}.{i}.{s}" for i in range(LAYERS) for s in (suffixes or all_suffixes)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    chars = string.ascii_lowercase + " .,?!:'-0123456789"
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    assert len(vocab) <= VOCAB
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def doc_batches(tokenizer, size: int = 3) -> list[dict]:
    return [encode_documents(tokenizer, PRETRAINING[i:i + size], MAX_LEN)
            for i in range(0, len(PRETRAINING), size)]


def finetune_batches(tokenizer, size: int = 2) -> list[dict]:
    return [encode_prompt_answer(tokenizer, [p for p, _ in FINETUNING[i:i + size]],
                                 [a for _, a in FINETUNING[i:i + size]], MAX_LEN)
            for i in range(0, len(FINETUNING), size)]


def assert_close_rel(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5, what: str = ""):
    """Close relative to the reference's scale (elementwise rtol fails on entries near zero)."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    scale = ref.abs().max().item()
    assert scale > 0, f"{what}: reference is all zero"
    err = (got - ref).abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} x {scale:.3g}"


# --------------------------------------------------------------------------------------------
# (a) which layers are tracked


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_default_tracked_layers(arch):
    model = build(arch)
    layers = find_tracked_layers(model)
    names = [layer.name for layer in layers]
    assert len(names) == len(set(names))
    assert set(names) == expected_names(arch)
    assert not any(k in n for n in names for k in ("embed", "lm_head", "wte", "wpe"))

    has_bias = ARCHITECTURES[arch][4]
    for layer in layers:
        weight = layer.module.weight
        assert layer.has_bias == has_bias == (layer.module.bias is not None), layer.name
        assert layer.transposed == (arch == "gpt2"), layer.name
        w_out_in = weight.T if layer.transposed else weight
        assert layer.gradient_shape == (w_out_in.shape[0], w_out_in.shape[1] + int(has_bias)), layer.name

    if arch == "llama":  # grouped KV heads: k and v are narrower than q
        shapes = {n.rsplit(".", 1)[-1]: layer.out_features for n, layer in zip(names, layers)}
        cfg = model.config
        assert shapes["q_proj"] == HIDDEN
        assert shapes["k_proj"] == shapes["v_proj"] == cfg.num_key_value_heads * HIDDEN // cfg.num_attention_heads
        assert shapes["k_proj"] < shapes["q_proj"]


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_include_exclude_patterns(arch):
    model = build(arch)
    mlp_only = find_tracked_layers(model, exclude=[r"attn|attention"])
    assert {layer.name for layer in mlp_only} == expected_names(arch, ARCHITECTURES[arch][3])

    # Naming layers with include= lifts the default exclusion of the head.
    with_head = [r"\.\d+\.", r"(^|\.)lm_head$"]
    if model.config.tie_word_embeddings:  # GPT-2: the head is the embedding matrix
        with pytest.raises(ValueError, match="shares its weight"):
            find_tracked_layers(model, include=with_head)
    else:
        tracked = find_tracked_layers(model, include=with_head)
        assert {layer.name for layer in tracked} == expected_names(arch) | {"lm_head"}
        head = next(layer for layer in tracked if layer.name == "lm_head")
        assert (head.out_features, head.in_features, head.has_bias) == (VOCAB, HIDDEN, False)

    first_block = find_tracked_layers(model, include=[r"\.0\."])
    assert {layer.name for layer in first_block} == {n for n in expected_names(arch) if ".0." in n}

    with pytest.raises(ValueError, match="no linear layer"):
        find_tracked_layers(model, include=[r"no_such_layer"])


# --------------------------------------------------------------------------------------------
# (b) per-sequence gradients == autograd of each sequence alone


@pytest.mark.parametrize("kind", ["documents", "prompt-answer"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_sequence_gradients_match_autograd(arch, kind, tokenizer):
    model = build(arch)
    task = LanguageModelingTask()
    if kind == "documents":  # every real token scored; rows of different lengths
        batch = encode_documents(tokenizer, PRETRAINING[:4], MAX_LEN)
    else:  # only answer tokens scored
        batch = encode_prompt_answer(tokenizer, [p for p, _ in FINETUNING], [a for _, a in FINETUNING], MAX_LEN)
    lengths = batch["attention_mask"].sum(1)
    assert (lengths < batch["input_ids"].shape[1]).any(), "the batch must contain right-padding"
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()

    layers = find_tracked_layers(model)
    if not model.config.tie_word_embeddings:
        # An untied head is a plain Linear: check it too. (GPT-2's head shares the embedding
        # matrix, whose .grad also holds the embedding-side gradient, so it cannot be compared.)
        layers = find_tracked_layers(model, include=[r"\.\d+\.", r"(^|\.)lm_head$"])
    got = sequence_gradients(model, task, batch, layers)
    assert set(got) == {layer.name for layer in layers}
    for layer in layers:
        assert got[layer.name].shape == (len(lengths),) + layer.gradient_shape

    for b, length in enumerate(lengths.tolist()):
        single = {k: v[b:b + 1, :length] for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        task.sequence_losses(model, single).sum().backward()
        for layer in layers:
            mapped = layer.parameter_gradients(got[layer.name][b])
            assert set(mapped) == ({"weight", "bias"} if layer.has_bias else {"weight"})
            for pname, value in mapped.items():
                ref = getattr(layer.module, pname).grad
                assert_close_rel(value, ref, 1e-5, f"{arch} row {b} {layer.name}.{pname}")
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("sample", [False, True])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_the_fused_head_loss_gives_the_plain_losses_gradients_and_draws(arch, sample, tokenizer, monkeypatch):
    """capture() fuses the LM head with the loss (logits a few rows at a time, scored rows only):
    activations, output gradients and sampled labels are those of the plain path."""
    from engine import tasks
    from engine.gradients import capture

    model = build(arch).double()
    batch = encode_documents(tokenizer, PRETRAINING[:4], MAX_LEN)
    layers = find_tracked_layers(model)
    monkeypatch.setattr(tasks, "HEAD_CHUNK_ELEMENTS", 3 * VOCAB)  # several chunks even here
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(tasks, "FUSED_HEAD_TYPES", tasks.FUSED_HEAD_TYPES if fused else ())
        with tasks.outputs_only():
            assert (tasks._fused_head(model) is not None) == fused  # the path under test runs
        generator = torch.Generator().manual_seed(5)
        runs.append(capture(model, LanguageModelingTask(), batch, layers, sample=sample, generator=generator))
    (a1, g1, _), (a2, g2, _) = runs
    for name in a1:
        torch.testing.assert_close(a1[name], a2[name], rtol=1e-12, atol=0)
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-9, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in g1.values())


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_factor_statistics_ignore_padding(arch, tokenizer):
    """Padded batches give the statistics of the same sequences fed one at a time, unpadded.

    The empirical Fisher keeps this deterministic (sampled labels depend on batch layout).
    """
    model = build(arch)
    task = LanguageModelingTask()
    layers = find_tracked_layers(model)
    padded = doc_batches(tokenizer, size=4)
    assert any((b["attention_mask"] == 0).any() for b in padded)
    single = [encode_documents(tokenizer, [text], MAX_LEN) for text in PRETRAINING]
    for strategy in ("kfac", "diagonal"):
        args = FactorArguments(strategy=strategy, fisher="empirical", progress=False)
        a, b = fit_factors(model, task, padded, layers, args), fit_factors(model, task, single, layers, args)
        assert (a.num_sequences, a.num_tokens) == (b.num_sequences, b.num_tokens)
        if strategy == "kfac":  # (the diagonal fit does not count tokens: num_tokens stays 0)
            assert a.num_tokens == sum(len(t) for t in PRETRAINING)  # one token per character
        for name in a.layers:
            for key, value in a.layers[name].tensors().items():
                if "eigen" not in key:  # eigenvectors are only defined up to sign / rotation
                    assert_close_rel(value, b.layers[name].tensors()[key], 1e-5, f"{strategy} {name} {key}")


# --------------------------------------------------------------------------------------------
# (c) end to end: two stages, factors on disk, three ways to the same multi-stage scores


def _finetune(model, tokenizer, steps: int = 5) -> None:
    """A few Adam steps on the response-token loss, as fine-tuning does."""
    task = LanguageModelingTask()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        for batch in finetune_batches(tokenizer):
            opt.zero_grad()
            batch_loss = task.sequence_losses(model, batch).sum() / (batch["labels"] != -100).sum()
            batch_loss.backward()
            opt.step()
    model.eval()


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_end_to_end_multi_stage(arch, tokenizer, tmp_path):
    task = LanguageModelingTask()
    build(arch).save_pretrained(tmp_path / "pretrained")
    pt = AutoModelForCausalLM.from_pretrained(tmp_path / "pretrained").eval()
    assert type(pt) is type(build(arch))

    child = copy.deepcopy(pt)
    _finetune(child, tokenizer)
    child.save_pretrained(tmp_path / "finetuned")
    ft = AutoModelForCausalLM.from_pretrained(tmp_path / "finetuned").eval()
    for (n, p), (_, q) in zip(child.named_parameters(), ft.named_parameters()):
        assert torch.equal(p, q), n

    pt_layers, ft_layers = find_tracked_layers(pt), find_tracked_layers(ft)
    docs = doc_batches(tokenizer)
    args = FactorArguments(strategy="ekfac", progress=False)
    fitted = {"pt": fit_factors(pt, task, docs, pt_layers, args),
              "ft": fit_factors(ft, task, finetune_batches(tokenizer), ft_layers, args)}

    loaded = {}
    for stage, factors in fitted.items():
        path = tmp_path / "factors" / stage
        factors.save(path)
        loaded[stage] = Factors.load(path)
        assert loaded[stage].strategy == "ekfac"
        assert (loaded[stage].num_sequences, loaded[stage].num_tokens) == (factors.num_sequences, factors.num_tokens)
        assert loaded[stage].model == factors.model
        assert set(loaded[stage].layers) == {layer.name for layer in pt_layers}
        for name, lf in factors.layers.items():
            ref, back = lf.tensors(), loaded[stage].layers[name].tensors()
            assert set(back) == set(ref) >= {"activation_eigenvectors", "gradient_eigenvectors",
                                             "corrected_eigenvalues"}
            for key in ref:
                # a float32 model keeps float32 factors (its eigendecompositions ran in float64)
                assert back[key].dtype == torch.float32 and torch.equal(back[key], ref[key]), (name, key)

    # Factors know which model they belong to, including a fresh load of the same checkpoint.
    loaded["pt"].check_compatible(pt, pt_layers)
    loaded["ft"].check_compatible(ft, ft_layers)
    reloaded_pt = AutoModelForCausalLM.from_pretrained(tmp_path / "pretrained")
    loaded["pt"].check_compatible(reloaded_pt, find_tracked_layers(reloaded_pt))
    with pytest.raises(FactorMismatchError):
        loaded["pt"].check_compatible(ft, ft_layers)
    with pytest.raises(FactorMismatchError):
        loaded["ft"].check_compatible(pt, pt_layers)
    with pytest.raises(FactorMismatchError):  # same weights, different tracked layers
        loaded["pt"].check_compatible(pt, find_tracked_layers(pt, exclude=[r"attn|attention"]))
    assert issubclass(engine.FactorMismatchError, ValueError)

    # Query gradients at theta_ft, preconditioned by both inverses.
    q_batch = encode_prompt_answer(tokenizer, [p for p, _ in QUERIES], [a for _, a in QUERIES], MAX_LEN)
    q_grads = sequence_gradients(ft, task, q_batch, ft_layers)
    query = precondition(q_grads, ScoreArguments(method="multi-stage", alpha=0.5), loaded["pt"], loaded["ft"])
    assert query.num_queries == len(QUERIES)
    assert set(query.damping) == {layer.name for layer in pt_layers} and all(d > 0 for d in query.damping.values())

    # 1. one streaming pass over the documents
    scores = score_documents(pt, task, docs, pt_layers, query, progress=False)
    assert scores.shape == (len(QUERIES), len(PRETRAINING))
    assert torch.isfinite(scores).all()
    assert scores.abs().max() > 0

    # 2. the same from stacked per-document gradients
    stacked = stack_gradients(pt, task, docs, pt_layers)
    assert next(iter(stacked.values())).shape[0] == len(PRETRAINING)
    assert_close_rel(score_gradients(query, stacked), scores, 1e-4, "score_gradients vs score_documents")

    # 3. token attribution totals (per layer and per token)
    parts = []
    for batch in docs:
        attr = attribute_tokens(pt, task, batch, pt_layers, query)
        assert attr.layer_names == [layer.name for layer in pt_layers]
        assert attr.token_scores.shape == (len(QUERIES),) + tuple(batch["input_ids"].shape)
        assert torch.isfinite(attr.token_scores).all()
        pad = batch["attention_mask"] == 0
        assert (attr.token_scores[:, pad] == 0).all(), "padding must not carry influence"
        assert_close_rel(attr.token_scores.sum(-1), attr.scores, 1e-4, "token sums vs layer sums")
        parts.append(attr.scores)
    assert_close_rel(torch.cat(parts, dim=1), scores, 1e-4, "attribute_tokens vs score_documents")

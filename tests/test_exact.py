"""Every estimator against an explicit computation on a model small enough to form the matrices.

The tiny GPT-NeoX runs in float64 so the comparisons can be tight. Brute-force references use
torch autograd on one sequence at a time and their own forward hooks, never the engine's capture.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from engine import (
    FactorArguments,
    FactorMismatchError,
    Factors,
    LanguageModelingTask,
    ScoreArguments,
    attribute_tokens,
    document_metric,
    find_tracked_layers,
    fit_factors,
    measure_documents,
    precondition,
    score_documents,
    score_gradients,
    sequence_gradients,
)
from engine.curvature import get_strategy, relative_damping
from engine.factors import label_seed

from conftest import layer_weight_gradients, lm_batch, tiny_neox

TASK = LanguageModelingTask()


def loader(n_batches=4, size=3, length=9, seed=10, prompt=0):
    return [lm_batch(size, length, seed + i, prompt=prompt) for i in range(n_batches)]


def autograd_gradients(model, layers, batch, losses_fn=None):
    """Per-sequence G (out, in[+1]) from param.grad, one sequence at a time."""
    out = {layer.name: [] for layer in layers}
    losses = (losses_fn or (lambda: TASK.sequence_losses(model, batch)))()
    for b in range(losses.shape[0]):
        for name, g in layer_weight_gradients(layers, losses[b]).items():
            out[name].append(g)
    return {k: torch.stack(v) for k, v in out.items()}


def explicit_activations(model, layers, batch):
    """(tokens, in[+1]) activations at unmasked positions, from the test's own hooks."""
    seen = {}
    handles = [layer.module.register_forward_hook(
        lambda m, args, out, name=layer.name: seen.__setitem__(name, args[0].detach())) for layer in layers]
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in handles:
        h.remove()
    keep = batch["attention_mask"].bool()
    result = {}
    for layer in layers:
        a = seen[layer.name][keep]
        result[layer.name] = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1) if layer.has_bias else a
    return result


def kron_matrix(lf, strategy: str) -> torch.Tensor:
    """The explicit Fisher approximation for row-major vec(G): vec(Q_S X Q_A^T) = (Q_S (x) Q_A) vec X."""
    if strategy == "diagonal":
        return torch.diag(lf.diagonal.flatten())
    basis = torch.kron(lf.gradient_eigenvectors, lf.activation_eigenvectors)
    lam = get_strategy(strategy).eigenvalues(lf).flatten()
    return basis @ torch.diag(lam) @ basis.T


@pytest.fixture(scope="module")
def layers(pt_model):
    return find_tracked_layers(pt_model)


@pytest.fixture(scope="module")
def empirical_factors(pt_model, layers):
    return fit_factors(pt_model, TASK, loader(), layers,
                       FactorArguments(fisher="empirical", progress=False, covariances=True))


def test_sequence_gradients_equal_autograd(pt_model, layers):
    batch = lm_batch(4, 9, seed=3, prompt=2)
    ours = sequence_gradients(pt_model, TASK, batch, layers)
    ref = autograd_gradients(pt_model, layers, batch)
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-9, atol=1e-12)


def test_covariances_equal_explicit(pt_model, layers, empirical_factors):
    batches = loader()
    for layer in layers:
        a = torch.cat([explicit_activations(pt_model, layers, b)[layer.name] for b in batches])
        torch.testing.assert_close(empirical_factors.layers[layer.name].activation_covariance,
                                   a.T @ a / len(a))
    assert empirical_factors.num_tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert empirical_factors.num_sequences == 12
    # S = sum over tokens of g g^T, divided by the number of *sequences* (G sums over tokens)
    for layer in layers:
        g = torch.cat([explicit_output_gradients(pt_model, layer, b) for b in batches])
        torch.testing.assert_close(empirical_factors.layers[layer.name].gradient_covariance, g.T @ g / 12)


def explicit_output_gradients(model, layer, batch):
    """(tokens, out) gradients of the summed data loss w.r.t. the layer's output, unmasked positions."""
    seen = {}

    def hook(module, args, out):
        out.retain_grad()
        seen["out"] = out

    handle = layer.module.register_forward_hook(hook)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    handle.remove()
    logp = torch.log_softmax(logits[:, :-1], -1)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    (-logp[keep].gather(1, labels[keep][:, None])).sum().backward()
    model.zero_grad()
    return seen["out"].grad[batch["attention_mask"].bool()]


def test_sequence_loss_is_summed_answer_nll(pt_model):
    batch = lm_batch(3, 9, seed=4, prompt=3)
    logits = pt_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1], -1)
    expected = torch.stack([
        -sum(logp[b, t - 1, batch["input_ids"][b, t]] for t in range(3, 9)
             if batch["attention_mask"][b, t]) for b in range(3)])
    torch.testing.assert_close(TASK.sequence_losses(pt_model, batch), expected)


def test_eigenvalue_correction_equals_brute_force(pt_model, layers, empirical_factors):
    grads = [autograd_gradients(pt_model, layers, b) for b in loader()]
    for layer in layers:
        lf = empirical_factors.layers[layer.name]
        g = torch.cat([gr[layer.name] for gr in grads])  # (N, out, in)
        rotated = lf.gradient_eigenvectors.T @ g @ lf.activation_eigenvectors
        torch.testing.assert_close(lf.corrected_eigenvalues, rotated.square().mean(0))
        # the diagonal strategy's statistic, fitted by its own pass
    diag = fit_factors(pt_model, TASK, loader(), layers,
                       FactorArguments(strategy="diagonal", fisher="empirical", progress=False))
    for layer in layers:
        g = torch.cat([gr[layer.name] for gr in grads])
        torch.testing.assert_close(diag.layers[layer.name].diagonal, g.square().mean(0))
    assert diag.num_tokens == empirical_factors.num_tokens and diag.num_sequences == 12


def test_true_fisher_samples_labels_reproducibly(pt_model, layers):
    """The correction pass with sampled labels equals brute force with the same samples."""
    args = FactorArguments(fisher="true", seed=5, label_samples=2, progress=False, covariances=True)
    fitted = fit_factors(pt_model, TASK, loader(), layers, args)
    assert fitted.num_sequences == 12  # draws are averaged, not counted as sequences
    grads = []
    for index, b in enumerate(loader()):
        for draw in range(args.label_samples):  # one label stream per (pass, batch, draw)
            generator = torch.Generator().manual_seed(label_seed(args.seed, "correction", index, draw))
            grads.append(autograd_gradients(pt_model, layers, b, lambda b=b, generator=generator: TASK.sequence_losses(
                pt_model, b, sample=True, generator=generator)))
    empirical = fit_factors(pt_model, TASK, loader(), layers,
                            FactorArguments(fisher="empirical", progress=False, covariances=True))
    for layer in layers:
        lf = fitted.layers[layer.name]
        g = torch.cat([gr[layer.name] for gr in grads])
        rotated = lf.gradient_eigenvectors.T @ g @ lf.activation_eigenvectors
        torch.testing.assert_close(lf.corrected_eigenvalues, rotated.square().mean(0))
        # sampled labels give a different S than the data's labels (the test can tell them apart)
        assert not torch.allclose(lf.gradient_covariance, empirical.layers[layer.name].gradient_covariance)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_inverse_hvp_equals_explicit_solve(pt_model, layers, strategy):
    factors = fit_factors(pt_model, TASK, loader(), layers,
                          FactorArguments(strategy=strategy, fisher="empirical", progress=False, covariances=True))
    rule = get_strategy(strategy)
    torch.manual_seed(0)
    for layer in layers:
        lf = factors.layers[layer.name]
        v = torch.randn(*layer.gradient_shape, dtype=torch.float64)
        h = kron_matrix(lf, strategy)
        damping = 0.1 * h.diagonal().mean().item()
        expected = torch.linalg.solve(h + damping * torch.eye(len(h), dtype=h.dtype), v.flatten())
        torch.testing.assert_close(rule.precondition(lf, v, damping).flatten(), expected)
    if strategy == "kfac":  # K-FAC's matrix is the Kronecker product S (x) A of the covariances
        lf = factors.layers[layers[0].name]
        torch.testing.assert_close(kron_matrix(lf, "kfac"),
                                   torch.kron(lf.gradient_covariance, lf.activation_covariance))


@pytest.mark.parametrize("strategy, keep", [("ekfac", 0.5), ("ekfac", 0.3), ("kfac", 0.5), ("ekfac", 1.0)])
def test_truncated_eigenbasis_is_the_explicit_solve_with_the_kept_pairs(pt_model, layers, strategy, keep):
    """Keeping each factor's top eigenvectors: (H_K + d I)^-1 with H_K the kept Kronecker pairs' part of
    H (1/d on every other direction), at the damping of the full factors."""
    factors = fit_factors(pt_model, TASK, loader(), layers,
                          FactorArguments(strategy=strategy, fisher="empirical", progress=False))
    rule = get_strategy(strategy)
    cut = factors.truncated(keep)
    torch.manual_seed(0)
    for layer in layers:
        full, lf = factors.layers[layer.name], cut.layers[layer.name]
        n_s, n_a = full.gradient_eigenvectors.shape[0], full.activation_eigenvectors.shape[0]
        assert lf.gradient_eigenvectors.shape == (n_s, math.ceil(keep * n_s))
        assert lf.activation_eigenvectors.shape == (n_a, math.ceil(keep * n_a))
        s = torch.topk(full.gradient_eigenvalues, lf.gradient_eigenvectors.shape[1]).indices
        a = torch.topk(full.activation_eigenvalues, lf.activation_eigenvectors.shape[1]).indices
        basis = torch.kron(full.gradient_eigenvectors[:, s], full.activation_eigenvectors[:, a])
        lam = rule.eigenvalues(full)[s][:, a].flatten()
        h = basis @ torch.diag(lam) @ basis.T
        damping = relative_damping(rule, full, 0.1)
        assert relative_damping(rule, lf, 0.1) == pytest.approx(damping, rel=1e-12)
        v = torch.randn(*layer.gradient_shape, dtype=torch.float64)
        expected = torch.linalg.solve(h + damping * torch.eye(len(h), dtype=h.dtype), v.flatten())
        torch.testing.assert_close(rule.precondition(lf, v, damping).flatten(), expected)
    with pytest.raises(ValueError, match="no eigenbasis to truncate"):
        get_strategy("diagonal").truncate(factors.layers[layers[0].name], 0.5)


def test_per_head_output_blocks(pt_model, layers):
    """split_outputs: S is the full S with cross-block entries zeroed, its eigenvectors stay within
    blocks, and the EK-FAC inverse is still the explicit solve with the resulting matrix."""
    qkv = next(layer for layer in layers if "query_key_value" in layer.name)
    heads = pt_model.config.num_attention_heads
    args = dict(fisher="empirical", progress=False, covariances=True)
    full = fit_factors(pt_model, TASK, loader(), layers, FactorArguments(**args))
    split = fit_factors(pt_model, TASK, loader(), layers, FactorArguments(
        **args, split_outputs={"query_key_value": heads}))
    size = qkv.out_features // heads
    s_full, s_split = full.layers[qkv.name].gradient_covariance, split.layers[qkv.name].gradient_covariance
    for i in range(heads):
        for j in range(heads):
            block = (slice(i * size, (i + 1) * size), slice(j * size, (j + 1) * size))
            expected = s_full[block] if i == j else torch.zeros_like(s_full[block])
            torch.testing.assert_close(s_split[block], expected)
    q_s = split.layers[qkv.name].gradient_eigenvectors
    assert (q_s.abs() > 1e-12).sum(0).max() <= size  # every eigenvector lives in one head's block
    other = next(layer for layer in layers if "query_key_value" not in layer.name)  # untouched layers
    torch.testing.assert_close(split.layers[other.name].gradient_covariance,
                               full.layers[other.name].gradient_covariance)
    lf = split.layers[qkv.name]
    v = torch.randn(*qkv.gradient_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h = kron_matrix(lf, "ekfac")
    expected = torch.linalg.solve(h + 0.05 * torch.eye(len(h), dtype=h.dtype), v.flatten())
    torch.testing.assert_close(get_strategy("ekfac").precondition(lf, v, 0.05).flatten(), expected)
    assert split.arguments["split_outputs"] == {"query_key_value": heads}
    with pytest.raises(ValueError, match="cannot be split into 5 equal blocks"):
        fit_factors(pt_model, TASK, loader(), layers, FactorArguments(
            **args, split_outputs={"query_key_value": 5}))


def _block_diag_matrix(factors, layers):
    return torch.block_diag(*[kron_matrix(factors.layers[layer.name], factors.strategy) for layer in layers])


def _block_damping(values, layers):
    return torch.diag(torch.cat([torch.full((layer.gradient_shape[0] * layer.gradient_shape[1],), values[layer.name],
                                            dtype=torch.float64) for layer in layers]))


@pytest.fixture(scope="module")
def two_stage(pt_model, ft_model):
    pt_layers, ft_layers = find_tracked_layers(pt_model), find_tracked_layers(ft_model)
    args = FactorArguments(progress=False, seed=1)
    pt_f = fit_factors(pt_model, TASK, loader(seed=20), pt_layers, args)
    ft_f = fit_factors(ft_model, TASK, loader(seed=40, prompt=3), ft_layers, args)
    query = lm_batch(2, 8, seed=99, prompt=5, ragged=False)
    docs = loader(n_batches=2, size=3, seed=70)
    return pt_layers, ft_layers, pt_f, ft_f, query, docs


def _flat(grads):
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)


@pytest.mark.parametrize("method", ["multi-stage", "pt-inverse-dropped", "single-stage",
                                    "gradient-dot", "gradient-cosine"])
def test_scores_equal_explicit_formulas(pt_model, ft_model, two_stage, method):
    pt_layers, ft_layers, pt_f, ft_f, query, docs = two_stage
    alpha = 0.3
    q_grads = sequence_gradients(ft_model, TASK, query, ft_layers)
    doc_model = ft_model if method == "single-stage" else pt_model
    doc_layers = ft_layers if method == "single-stage" else pt_layers
    d_grads = [sequence_gradients(doc_model, TASK, b, doc_layers) for b in docs]
    pre = precondition(q_grads, ScoreArguments(method=method, alpha=alpha), pt_f, ft_f)

    q, d = _flat(q_grads), torch.cat([_flat(g) for g in d_grads])
    eye = torch.eye(q.shape[1], dtype=torch.float64)
    h_pt, h_ft = _block_diag_matrix(pt_f, pt_layers), _block_diag_matrix(ft_f, ft_layers)
    if method == "multi-stage":
        lam = _block_damping(pre.damping, pt_layers)
        m = alpha * torch.linalg.inv(h_ft + alpha * eye) @ torch.linalg.inv(h_pt + lam)
    elif method == "pt-inverse-dropped":
        m = alpha * torch.linalg.inv(h_ft + alpha * eye)
    elif method == "single-stage":
        m = torch.linalg.inv(h_ft + _block_damping(pre.damping, ft_layers))
    else:
        m = eye
    expected = q @ m @ d.T
    if method == "gradient-cosine":
        expected = expected / q.norm(dim=1, keepdim=True) / d.norm(dim=1)
    # relative damping is 0.1 x the mean eigenvalue of each layer, as documented
    for name, value in pre.damping.items():
        f = ft_f if method == "single-stage" else pt_f
        assert value == pytest.approx(0.1 * f.layers[name].corrected_eigenvalues.mean().item())
    streamed = score_documents(doc_model, TASK, docs, doc_layers, pre, progress=False)
    torch.testing.assert_close(streamed, expected, rtol=1e-7, atol=1e-10)
    in_memory = score_gradients(pre, {k: torch.cat([g[k] for g in d_grads]) for k in d_grads[0]})
    torch.testing.assert_close(in_memory, expected, rtol=1e-7, atol=1e-10)
    assert expected.abs().max() > 0


def test_token_and_layer_contributions_sum_to_total(pt_model, ft_model, two_stage):
    pt_layers, ft_layers, pt_f, ft_f, query, docs = two_stage
    args = ScoreArguments(method="multi-stage", alpha=0.5)
    pre = precondition(sequence_gradients(ft_model, TASK, query, ft_layers), args, pt_f, ft_f)
    total = score_documents(pt_model, TASK, docs[:1], pt_layers, pre, progress=False)
    att = attribute_tokens(pt_model, TASK, docs[0], pt_layers, pre, chunk=1)
    torch.testing.assert_close(att.token_scores.sum(-1), total)
    torch.testing.assert_close(att.layer_scores.sum(-1), total)
    # padded positions carry nothing
    assert att.token_scores[:, docs[0]["attention_mask"] == 0].abs().max() == 0
    # the per-layer numbers are each layer's own <u_l, G_l>
    g = sequence_gradients(pt_model, TASK, docs[0], pt_layers)
    for j, layer in enumerate(pt_layers):
        expected = torch.einsum("qoi,boi->qb", pre.vectors[layer.name], g[layer.name])
        torch.testing.assert_close(att.layer_scores[:, :, j], expected)


def test_answer_token_split_sums_to_answer_score(pt_model, ft_model, two_stage):
    pt_layers, ft_layers, pt_f, ft_f, query, docs = two_stage
    args = ScoreArguments(method="multi-stage", alpha=0.5)
    whole = precondition(sequence_gradients(ft_model, TASK, query, ft_layers), args, pt_f, ft_f)
    split, positions = TASK.split_targets(query)
    assert len(positions) == int((query["labels"] != -100).sum())
    per_token = precondition(sequence_gradients(ft_model, TASK, split, ft_layers), args, pt_f, ft_f)
    s_whole = score_documents(pt_model, TASK, docs, pt_layers, whole, progress=False)
    s_split = score_documents(pt_model, TASK, docs, pt_layers, per_token, progress=False)
    for row in range(query["input_ids"].shape[0]):
        torch.testing.assert_close(s_split[positions[:, 0] == row].sum(0), s_whole[row])
    # answer-token x document-token map: its entries sum to the document's total score
    att = attribute_tokens(pt_model, TASK, docs[0], pt_layers, per_token)
    torch.testing.assert_close(att.token_scores[positions[:, 0] == 0].sum((0, 2)), s_whole[0, :3])


def test_positive_score_means_document_raises_answer_likelihood(pt_model, two_stage):
    """Sign convention, end to end: a small gradient step on a document changes the answer's
    log-likelihood by step * (gradient-dot score)."""
    pt_layers, _, _, _, query, docs = two_stage
    model = copy.deepcopy(pt_model)
    layers = find_tracked_layers(model)
    doc = {k: v[:1] for k, v in docs[0].items()}
    pre = precondition(sequence_gradients(model, TASK, query, layers), ScoreArguments(method="gradient-dot"))
    score = score_documents(model, TASK, [doc], layers, pre, progress=False)[:, 0]
    before = -TASK.sequence_losses(model, query).detach()
    step = 1e-6
    g_doc = sequence_gradients(model, TASK, doc, layers)
    with torch.no_grad():
        for layer in layers:
            for pname, grad in layer.parameter_gradients(g_doc[layer.name][0]).items():
                getattr(layer.module, pname).sub_(step * grad)  # gradient descent on the document
    after = -TASK.sequence_losses(model, query).detach()
    torch.testing.assert_close((after - before) / step, score, rtol=1e-3, atol=1e-6)


def test_batch_size_and_padding_invariance(pt_model, layers):
    docs = [lm_batch(1, n, seed=s, ragged=False) for s, n in [(1, 9), (2, 5), (3, 7), (4, 9)]]
    width = 9

    def pad(d):
        extra = width - d["input_ids"].shape[1]
        return {"input_ids": torch.nn.functional.pad(d["input_ids"], (0, extra)),
                "attention_mask": torch.nn.functional.pad(d["attention_mask"], (0, extra)),
                "labels": torch.nn.functional.pad(d["labels"], (0, extra), value=-100)}

    together = [{k: torch.cat([pad(d)[k] for d in docs]) for k in docs[0]}]
    args = FactorArguments(fisher="empirical", progress=False)
    f_one, f_all = (fit_factors(pt_model, TASK, data, layers, args) for data in (docs, together))
    for name in f_one.layers:
        for key, t in f_one.layers[name].tensors().items():
            if "eigenvectors" not in key:  # eigenvectors are defined up to sign
                torch.testing.assert_close(t, getattr(f_all.layers[name], key))
    pre = precondition(sequence_gradients(pt_model, TASK, docs[0], layers), ScoreArguments(method="gradient-dot"))
    torch.testing.assert_close(score_documents(pt_model, TASK, docs, layers, pre, progress=False),
                               score_documents(pt_model, TASK, together, layers, pre, progress=False))


def test_factors_round_trip_and_mismatch(tmp_path, pt_model, ft_model, empirical_factors, layers):
    path = tmp_path / "factors" / "pt"
    empirical_factors.save(path)
    loaded = Factors.load(path)
    assert loaded.strategy == "ekfac" and loaded.num_sequences == 12
    assert loaded.arguments["fisher"] == "empirical"
    for name, lf in empirical_factors.layers.items():
        for key, t in lf.tensors().items():
            torch.testing.assert_close(getattr(loaded.layers[name], key), t, rtol=0, atol=0)
    loaded.check_compatible(pt_model, layers)
    with pytest.raises(FactorMismatchError, match="weights do not match"):
        loaded.check_compatible(ft_model, find_tracked_layers(ft_model))
    nudged = copy.deepcopy(pt_model)  # a change confined to one bias is still caught
    with torch.no_grad():
        find_tracked_layers(nudged)[-1].module.bias.add_(1e-2)
    with pytest.raises(FactorMismatchError):
        loaded.check_compatible(nudged, find_tracked_layers(nudged))
    other = tiny_neox(seed=0, hidden=12)
    with pytest.raises(FactorMismatchError, match="tracked layers differ"):
        loaded.check_compatible(other, find_tracked_layers(other))
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left no temporary behind
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error type, whatever it is
        Factors.load(tmp_path / "bad.safetensors")


def test_bad_arguments_say_what_is_wrong(pt_model, layers, empirical_factors):
    grads = sequence_gradients(pt_model, TASK, lm_batch(1, 6, seed=1), layers)
    with pytest.raises(ValueError, match="alpha"):
        precondition(grads, ScoreArguments(method="multi-stage"), empirical_factors, empirical_factors)
    with pytest.raises(ValueError, match="pretrained model's factors"):
        precondition(grads, ScoreArguments(method="multi-stage", alpha=1.0), None, empirical_factors)
    with pytest.raises(ValueError, match="unknown method"):
        precondition(grads, ScoreArguments(method="magic"))
    with pytest.raises(ValueError, match="no linear layer"):
        find_tracked_layers(pt_model, include=[r"does-not-exist"])
    with pytest.raises(ValueError, match="no batch"):
        fit_factors(pt_model, TASK, [], layers, FactorArguments(progress=False))
    with pytest.raises(ValueError, match="unknown curvature"):
        fit_factors(pt_model, TASK, loader(), layers, FactorArguments(strategy="nope", progress=False))


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_whitening_keeps_inner_products(pt_model, layers, strategy):
    """<u, G> = <W^-1 u, W G> with W = (H_pt + lambda I)^-1/2, and W G is explicit."""
    from engine.gradients import capture
    from engine.influence import damping_values
    from engine.projection import Whitening

    factors = fit_factors(pt_model, TASK, loader(), layers,
                          FactorArguments(strategy=strategy, fisher="empirical", progress=False))
    damping = damping_values(factors, ScoreArguments())
    white = Whitening(factors, damping)
    query = precondition(sequence_gradients(pt_model, TASK, lm_batch(2, 8, seed=5), layers),
                         ScoreArguments(method="gradient-dot"))
    docs = lm_batch(3, 9, seed=6)
    acts, grads, _ = capture(pt_model, TASK, docs, layers)
    w_docs, w_query = white.documents(acts, grads), white.queries(query.vectors)
    whitened = sum(torch.einsum("qoi,boi->qb", w_query[k], w_docs[k]) for k in w_docs)
    torch.testing.assert_close(whitened, score_gradients(query, sequence_gradients(pt_model, TASK, docs, layers)))
    complete = Whitening(factors, damping, keep=10**9)  # every coordinate kept: exact
    torch.testing.assert_close(complete.query_vectors(query.vectors) @ complete.document_vectors(acts, grads).T,
                               whitened)
    few = Whitening(factors, damping, keep=5)
    assert few.dim == 5 * len(layers)
    for layer in layers:  # the kept coordinates are the largest eigenvalues
        lam = get_strategy(strategy).eigenvalues(factors.layers[layer.name]).flatten()
        assert lam[few.kept[layer.name]].min() >= lam.sort(descending=True).values[4]
    g = sequence_gradients(pt_model, TASK, docs, layers)
    for layer in layers:  # ||W G||^2 = G^T (H + lambda I)^-1 G with the explicit matrix
        h = kron_matrix(factors.layers[layer.name], strategy)
        inv = torch.linalg.inv(h + damping[layer.name] * torch.eye(len(h), dtype=h.dtype))
        flat = g[layer.name].flatten(1)
        torch.testing.assert_close(w_docs[layer.name].flatten(1).square().sum(1),
                                   torch.einsum("bi,ij,bj->b", flat, inv, flat))


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
@pytest.mark.parametrize("keep", [7, None])
def test_whitened_coordinates_gathered_in_token_space_equal_the_rotation(pt_model, layers, strategy, keep):
    """(Q_S^T G Q_A)[i, j] / sqrt(Lambda + lambda) gathered from (Q_S^T g_t)(Q_A^T a_t) equals the
    coordinate of the explicitly formed and rotated G, for documents and queries alike."""
    from engine.gradients import capture
    from engine.influence import damping_values
    from engine.projection import Whitening

    factors = fit_factors(pt_model, TASK, loader(), layers,
                          FactorArguments(strategy=strategy, fisher="empirical", progress=False))
    white = Whitening(factors, damping_values(factors, ScoreArguments()), keep=keep)
    acts, grads, _ = capture(pt_model, TASK, lm_batch(3, 9, seed=6), layers)
    full = white.documents(acts, grads)
    expected = torch.cat([full[n].flatten(1)[:, white.kept[n]] for n in white.kept], 1)
    torch.testing.assert_close(white.document_vectors(acts, grads), expected)
    u = {n: torch.randn(2, *layer.gradient_shape, dtype=torch.float64) for n, layer in zip(white.kept, layers)}
    full_u = white.queries(u)
    torch.testing.assert_close(white.query_vectors(u),
                               torch.cat([full_u[n].flatten(1)[:, white.kept[n]] for n in white.kept], 1))


def test_factor_directories_hold_one_file_per_layer_and_load_lazily(tmp_path, pt_model, layers):
    from engine.factors import StoredLayers

    single = copy.deepcopy(pt_model).float()  # a float32 model keeps float32 factors
    fitted = fit_factors(single, TASK, loader(), find_tracked_layers(single), FactorArguments(progress=False))
    directory = tmp_path / "pt"
    fitted.save(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["index.json"] + [
        f"layer-{i:04d}.safetensors" for i in range(len(layers))]
    loaded = Factors.load(directory)
    assert isinstance(loaded.layers, StoredLayers) and loaded.layers._loaded == {}  # nothing read yet
    name = layers[1].name
    back = loaded.layers[name]
    assert list(loaded.layers._loaded) == [name]
    assert set(back.tensors()) == {"activation_eigenvectors", "activation_eigenvalues", "gradient_eigenvectors",
                                   "gradient_eigenvalues", "corrected_eigenvalues"}  # no covariances by default
    assert all(t.dtype == torch.float32 for t in back.tensors().values())
    torch.testing.assert_close(back.corrected_eigenvalues, fitted.layers[name].corrected_eigenvalues, rtol=0, atol=0)
    old = tmp_path / "pretrained.safetensors"  # the one-file format of an older msif
    old.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="older msif"):
        Factors.load(old)


def test_float32_sums_agree_with_float64_sums(pt_model, layers):
    """The default float32 accumulation against float64 (both on a float32 model): Lambda agrees to
    float32 rounding relative to the layer's largest eigenvalue (the smallest ones, ~1e-9 of it,
    are rounding noise in either precision) and a multi-stage score agrees too."""
    model = copy.deepcopy(pt_model).float()
    model_layers = find_tracked_layers(model)
    data = [{k: v for k, v in b.items()} for b in loader(n_batches=8)]
    fits = {acc: fit_factors(model, TASK, data, model_layers, FactorArguments(progress=False, accumulation=acc))
            for acc in ("float32", "float64")}
    for layer in model_layers:
        lam32, lam64 = (fits[acc].layers[layer.name].corrected_eigenvalues.double() for acc in ("float32", "float64"))
        assert float((lam32 - lam64).abs().max() / lam64.abs().max()) < 1e-5
    grads = sequence_gradients(model, TASK, lm_batch(2, 8, seed=7), model_layers)
    args = ScoreArguments(method="multi-stage", alpha=0.5)
    scores = [score_documents(model, TASK, data, model_layers, precondition(grads, args, f, f), progress=False)
              for f in fits.values()]
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-6 * float(scores[1].abs().max()))


def test_kept_coordinates_break_ties_by_position():
    """Equal eigenvalues are kept in index order, so documents whitened on one device and queries
    on another select the same coordinates in the same order."""
    from engine.curvature import LayerFactors
    from engine.projection import Whitening

    lam = torch.tensor([[1.0, 3.0, 3.0, 1.0], [3.0, 1.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    factors = Factors("diagonal", {"l": LayerFactors(diagonal=lam)}, 1, 1, {})
    assert Whitening(factors, {"l": 0.1}, keep=6).kept["l"].tolist() == [1, 2, 4, 7, 8, 9]


@pytest.mark.parametrize("method", ["multi-stage", "pt-inverse-dropped", "single-stage", "gradient-dot"])
def test_document_norms_equal_explicit_formulas(pt_model, ft_model, two_stage, method):
    """|G| and the RelatIF norm sqrt(G^T M G), M the method's document-side inverse, formed explicitly."""
    pt_layers, ft_layers, pt_f, ft_f, query, docs = two_stage
    alpha, args = 0.3, ScoreArguments(method=method, alpha=0.3)
    doc_model, doc_layers = (ft_model, ft_layers) if method == "single-stage" else (pt_model, pt_layers)
    pre = precondition(sequence_gradients(ft_model, TASK, query, ft_layers), args, pt_f, ft_f)
    metric = document_metric(args, pt_f, ft_f)
    measured = measure_documents(doc_model, TASK, docs, doc_layers, pre, progress=False, metric=metric)
    d = torch.cat([_flat(sequence_gradients(doc_model, TASK, b, doc_layers)) for b in docs])
    torch.testing.assert_close(measured.sq_norms, d.square().sum(1), rtol=1e-9, atol=0)
    torch.testing.assert_close(measured.scores, score_documents(doc_model, TASK, docs, doc_layers, pre, progress=False))
    if method == "gradient-dot":
        assert metric is None and measured.metric_sq_norms is None
        return
    eye = torch.eye(d.shape[1], dtype=torch.float64)
    if method == "multi-stage":
        m = torch.linalg.inv(_block_diag_matrix(pt_f, pt_layers) + _block_damping(metric.damping, pt_layers))
    elif method == "single-stage":
        m = torch.linalg.inv(_block_diag_matrix(ft_f, ft_layers) + _block_damping(metric.damping, ft_layers))
    else:
        m = alpha * torch.linalg.inv(_block_diag_matrix(ft_f, ft_layers) + alpha * eye)
    expected = torch.einsum("ni,ij,nj->n", d, m, d)
    torch.testing.assert_close(measured.metric_sq_norms, expected, rtol=1e-8, atol=0)
    both = measure_documents(doc_model, TASK, docs, doc_layers, pre, progress=False, metric=[metric, metric])
    torch.testing.assert_close(both.metric_sq_norms, torch.stack([expected, expected]), rtol=1e-8, atol=0)
    assert (expected > 0).all() and not torch.allclose(expected / expected[0], d.square().sum(1) / d[0].square().sum())


def test_shortest_first_keeps_every_row_within_the_callers_budget():
    from engine.text import encode_document_batches, shortest_first

    class Tok:  # one token per word: lengths are known
        pad_token_id, eos_token_id = 0, 0

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[1 + len(w) for w in t.split()] for t in texts]}

    texts = [" ".join(["w"] * n) for n in (9, 2, 7, 2, 8, 3, 2, 9, 4, 2)]
    batches = list(encode_document_batches(Tok(), texts, 16, max_tokens=30))
    repacked = list(shortest_first(batches, window=6))
    positions = [p for _, rows in repacked for p in rows]
    assert sorted(positions) == list(range(len(texts)))
    for batch, rows in repacked:
        assert batch["attention_mask"].sum(1).tolist() == [len(texts[p].split()) for p in rows]
        assert (batch["labels"] == torch.where(batch["attention_mask"] == 1, batch["input_ids"], -100)).all()
    # each window (6 rows, then 4) keeps the largest input batch's row and token counts
    assert max(len(b["input_ids"]) for b, _ in repacked) <= max(len(b["input_ids"]) for b in batches)
    assert max(b["input_ids"].numel() for b, _ in repacked) <= max(b["input_ids"].numel() for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    assert sum(b["input_ids"].numel() for b, _ in repacked) < padded
    # a batch it cannot repack (left padding) passes through, in place
    left = {k: v.flip(1) for k, v in batches[0].items()}
    out = list(shortest_first([left, batches[1]]))
    first, second = len(left["input_ids"]), len(batches[1]["input_ids"])
    assert out[0][0] is left and out[0][1] == list(range(first))
    assert sorted(p for _, rows in out[1:] for p in rows) == list(range(first, first + second))

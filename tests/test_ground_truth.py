"""Ground-truth checks of the influence pipeline against quantities computed without EK-FAC.

1. EK-FAC against the exact damped Fisher, layer by layer, on a tiny trained GPT-NeoX: single-stage
   scores q_l^T (F_l + lambda I)^-1 d_l with F_l the full (out*(in+1))^2 Fisher block of the layer,
   built from per-sequence gradients with labels sampled from the model (our own sampling, not the
   engine's), against the engine's EK-FAC ``precondition``.
2. Influence against actual leave-one-out retraining of an L2-regularised softmax regression.

Run with ``pytest -s`` to see the numbers.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from engine import (
    ClassificationTask,
    FactorArguments,
    LanguageModelingTask,
    ScoreArguments,
    find_tracked_layers,
    fit_factors,
    precondition,
    score_gradients,
    sequence_gradients,
)
from engine.tasks import IGNORE


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(stats.pearsonr(x.flatten().double().numpy(), y.flatten().double().numpy())[0])


def _spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(stats.spearmanr(x.flatten().double().numpy(), y.flatten().double().numpy())[0])


# --------------------------------------------------------------------------------------------
# 1. EK-FAC vs the exact damped Fisher block of every tracked layer
# --------------------------------------------------------------------------------------------

VOCAB, LENGTH = 64, 16


def _sequences(n: int, seed: int, noise: float = 0.1) -> dict:
    """Learnable synthetic text: repeated random motifs (needs copying from context) or
    arithmetic progressions mod VOCAB, with ``noise`` of the tokens replaced at random, and
    right padding of 0-3 tokens (unscored, masked)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, LENGTH, dtype=torch.long)
    for i in range(n):
        if torch.randint(0, 2, (1,), generator=g).item() == 0:
            period = torch.randint(3, 6, (1,), generator=g).item()
            motif = torch.randint(0, VOCAB, (period,), generator=g)
            seq = motif.repeat(LENGTH // period + 1)[:LENGTH]
        else:
            start = torch.randint(0, VOCAB, (1,), generator=g).item()
            step = torch.randint(1, 4, (1,), generator=g).item()
            seq = (start + step * torch.arange(LENGTH)) % VOCAB
        flip = torch.rand(LENGTH, generator=g) < noise
        ids[i] = torch.where(flip, torch.randint(0, VOCAB, (LENGTH,), generator=g), seq)
    mask = torch.ones_like(ids)
    lengths = LENGTH - torch.randint(0, 4, (n,), generator=g)
    for i in range(n):
        mask[i, lengths[i]:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)}


def _batches(data: dict, size: int) -> list[dict]:
    n = data["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in data.items()} for i in range(0, n, size)]


def _mean_token_loss(model, task, data) -> float:
    with torch.no_grad():
        return float(task.token_losses(model, data).sum() / (data["labels"][:, 1:] != IGNORE).sum())


def _trained_neox(task: LanguageModelingTask, steps: int = 1000) -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=32, use_parallel_residual=False)
    model = GPTNeoXForCausalLM(config)
    train = _sequences(2048, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, 2048, (64,))
        batch = {k: v[idx] for k, v in train.items()}
        loss = task.token_losses(model, batch).sum() / (batch["labels"][:, 1:] != IGNORE).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def _with_sampled_labels(model, batch: dict, generator: torch.Generator) -> dict:
    """The batch with every scored target replaced by a draw from the model's own prediction.

    Done here, independently of the engine's ``sample=True`` path, so the reference Fisher does
    not share the engine's label sampling.
    """
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    probs = torch.softmax(logits[:, :-1].double(), dim=-1)
    drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    drawn = drawn.view(probs.shape[:2])
    labels = batch["labels"].clone()
    keep = labels[:, 1:] != IGNORE
    labels[:, 1:] = torch.where(keep, drawn, torch.full_like(drawn, IGNORE))
    return {**batch, "labels": labels}


def _exact_fisher_blocks(model, task, data: dict, layers, samples: int, seed: int) -> dict:
    """F_l = E_seq E_{y~p}[vec G_l vec G_l^T], float64, ``samples`` label draws per sequence."""
    generator = torch.Generator().manual_seed(seed)
    replicated = {k: v.repeat(samples, 1) for k, v in data.items()}
    sums, count = {}, 0
    for batch in _batches(replicated, 512):
        grads = sequence_gradients(model, task, _with_sampled_labels(model, batch, generator), layers)
        for name, g in grads.items():
            g = g.double().flatten(1)
            sums[name] = sums.get(name, 0) + g.T @ g
        count += batch["input_ids"].shape[0]
    return {name: s / count for name, s in sums.items()}


def _check_gradients_against_autograd(model, task, batch: dict, layers) -> None:
    """The engine's per-sequence G (bias = last column) equals autograd's parameter gradients."""
    grads = sequence_gradients(model, task, batch, layers)
    for i in range(batch["input_ids"].shape[0]):
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"][i:i + 1],
                       attention_mask=batch["attention_mask"][i:i + 1]).logits
        F.cross_entropy(logits[0, :-1], batch["labels"][i, 1:], ignore_index=IGNORE,
                        reduction="sum").backward()
        for layer in layers:
            g = grads[layer.name][i]
            torch.testing.assert_close(g[:, :layer.in_features], layer.module.weight.grad,
                                       rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(g[:, layer.in_features], layer.module.bias.grad,
                                       rtol=1e-4, atol=1e-6)
    model.zero_grad()


@pytest.mark.slow
def test_ekfac_matches_exact_damped_fisher_per_layer(one_thread):
    """Per layer, EK-FAC single-stage scores correlate > 0.8 with the exact damped Fisher's.

    Model choice, measured while writing this test (Pearson, damping 0.1 x mean eigenvalue):
    EK-FAC is weakest on layer-0 maps, whose inputs are LayerNorm(token embedding), i.e. only
    VOCAB distinct vectors. With VOCAB=32 layer 0's QKV scored 0.77-0.86 across four seeds; with
    GPT-NeoX's default parallel residual the layer-0 MLP input is also LayerNorm(embedding) and
    scored 0.77-0.82 (the best Kronecker basis of the exact block, its nearest Kronecker product,
    gives the same 0.79: an EK-FAC limit, not an engine bug). Hence VOCAB=64 and the sequential
    residual, for which every layer scored >= 0.83 on each of four seeds.
    """
    start = time.perf_counter()
    task = LanguageModelingTask()
    model = _trained_neox(task)
    fit = _sequences(512, seed=2)
    queries, docs = _sequences(8, seed=3), _sequences(256, seed=4)

    fit_loss = _mean_token_loss(model, task, fit)
    print(f"\n[ekfac-vs-exact] trained in {time.perf_counter() - start:.1f}s; held-out token loss "
          f"{fit_loss:.3f} nats (uniform: {math.log(VOCAB):.3f})")
    assert fit_loss < math.log(VOCAB) - 1.0, "the model did not learn the synthetic patterns"

    layers = find_tracked_layers(model)
    assert len(layers) == 8  # QKV, attention out, MLP up, MLP down in each of 2 blocks
    _check_gradients_against_autograd(model, task, _batches(queries, 3)[0], layers)

    factors = fit_factors(model, task, _batches(fit, 64), layers,  # float64 factors: an exact comparison
                          FactorArguments(strategy="ekfac", fisher="true", seed=0, progress=False, dtype="float64"))
    exact = _exact_fisher_blocks(model, task, fit, layers, samples=64, seed=123)
    q_grads = {k: v.double() for k, v in sequence_gradients(model, task, queries, layers).items()}
    d_grads = {k: v.double() for k, v in sequence_gradients(model, task, docs, layers).items()}

    rows = []
    for layer in layers:
        name = layer.name
        fisher = exact[name]
        dim = fisher.shape[0]
        eye = torch.eye(dim, dtype=torch.float64)
        damping = 0.1 * float(torch.trace(fisher)) / dim  # 0.1 x mean eigenvalue of the exact block
        q, d = q_grads[name].flatten(1), d_grads[name].flatten(1)

        exact_scores = torch.linalg.solve(fisher + damping * eye, q.T).T @ d.T
        query = precondition({name: q_grads[name]},
                             ScoreArguments(method="single-stage", damping=damping), ft_factors=factors)
        ekfac_scores = score_gradients(query, {name: d_grads[name]})
        identity_scores = q @ d.T

        # The engine's EK-FAC is the matrix (Q_S x Q_A) diag(Lambda) (Q_S x Q_A)^T, damped ...
        f = factors.layers[name]
        basis = torch.kron(f.gradient_eigenvectors, f.activation_eigenvectors)
        lam = f.corrected_eigenvalues.flatten()
        explicit = torch.linalg.solve(basis @ torch.diag(lam) @ basis.T + damping * eye, q.T).T @ d.T
        torch.testing.assert_close(ekfac_scores, explicit, rtol=1e-6,
                                   atol=1e-8 * float(explicit.abs().max()))
        # ... and its corrected eigenvalues estimate the exact block's diagonal in that basis.
        oracle = torch.diagonal(basis.T @ fisher @ basis)
        lambda_error = float((lam - oracle).norm() / oracle.norm())

        per_query = np.mean([_pearson(ekfac_scores[i], exact_scores[i]) for i in range(len(q))])
        rows.append(dict(name=name, dim=dim, damping=damping, lambda_error=lambda_error,
                         pearson=_pearson(ekfac_scores, exact_scores),
                         spearman=_spearman(ekfac_scores, exact_scores), per_query=per_query,
                         id_pearson=_pearson(identity_scores, exact_scores),
                         id_spearman=_spearman(identity_scores, exact_scores)))

    print(f"{'layer':42s} {'dim':>4s} {'lambda':>8s} {'|dLam|':>6s}  EK-FAC pearson/spearman "
          f"(mean per query)  identity pearson/spearman")
    for r in rows:
        print(f"{r['name']:42s} {r['dim']:4d} {r['damping']:8.2e} {r['lambda_error']:6.3f}  "
              f"{r['pearson']:.3f} / {r['spearman']:.3f} ({r['per_query']:.3f})        "
              f"{r['id_pearson']:.3f} / {r['id_spearman']:.3f}")
    ek_mean = np.mean([r["pearson"] for r in rows])
    id_mean = np.mean([r["id_pearson"] for r in rows])
    print(f"mean Pearson: EK-FAC {ek_mean:.3f}, identity {id_mean:.3f}; "
          f"{time.perf_counter() - start:.1f}s in all")

    for r in rows:
        assert r["lambda_error"] < 0.25, (r["name"], r["lambda_error"])
        assert r["pearson"] > 0.8, (r["name"], r["pearson"])
    assert ek_mean > id_mean + 0.1, (ek_mean, id_mean)


# --------------------------------------------------------------------------------------------
# 2. Influence vs leave-one-out retraining (softmax regression)
# --------------------------------------------------------------------------------------------

def _objective(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, reg: float) -> torch.Tensor:
    """mean CE + (reg/2) ||theta||^2, theta = [W | b] flattened, shape (C * (d + 1),)."""
    w = theta.view(-1, x.shape[1] + 1)
    logits = x @ w[:, :-1].T + w[:, -1]
    return F.cross_entropy(logits, y) + 0.5 * reg * theta.square().sum()


def _newton(theta, x, y, reg, tol=1e-12, max_iter=50):
    grad = torch.func.grad(_objective)
    hess = torch.func.hessian(_objective)
    for _ in range(max_iter):
        g = grad(theta, x, y, reg)
        if g.norm() < tol:
            return theta
        theta = theta - torch.linalg.solve(hess(theta, x, y, reg), g)
    raise AssertionError(f"Newton did not converge: |grad| = {float(g.norm()):.2e}")


def _log_likelihood(theta, x, y):
    w = theta.view(-1, x.shape[1] + 1)
    return torch.log_softmax(x @ w[:, :-1].T + w[:, -1], dim=-1).gather(1, y[:, None]).squeeze(1)


@pytest.mark.slow
def test_influence_predicts_leave_one_out_retraining(one_thread):
    """-I(z)/n predicts the change of a test point's log-likelihood when z is left out.

    I(z) = grad L_q^T (H + reg I)^-1 grad l(z) with L_q = -log p(y_q|x_q) and H the Hessian of the
    mean CE, which for softmax regression equals the true Fisher that EK-FAC approximates.
    Measured while writing: EK-FAC is not exact here (its Kronecker basis, not label-sampling noise,
    limits it: an oracle Lambda gives the same numbers), and it degrades for confident models or
    non-centred / anisotropic inputs (per-query Pearson down to 0.73-0.85), while the exact Hessian
    stays >= 0.94. Hence the moderate-signal, centred, isotropic data below.
    """
    start = time.perf_counter()
    n, dim, classes, reg = 150, 6, 3, 1e-2
    g = torch.Generator().manual_seed(0)
    w_true = 0.5 * torch.randn(classes, dim, generator=g, dtype=torch.float64)

    def draw(m):
        x = torch.randn(m, dim, generator=g, dtype=torch.float64)
        return x, torch.multinomial(torch.softmax(x @ w_true.T, -1), 1, generator=g).squeeze(1)

    x, y = draw(n)
    xq, yq = draw(6)
    theta = _newton(torch.zeros(classes * (dim + 1), dtype=torch.float64), x, y, reg)
    base = _log_likelihood(theta, xq, yq)

    actual = torch.empty(len(xq), n, dtype=torch.float64)
    for z in range(n):
        keep = torch.arange(n) != z
        theta_z = _newton(theta.clone(), x[keep], y[keep], reg)  # warm start at the optimum
        actual[:, z] = _log_likelihood(theta_z, xq, yq) - base
    loo_seconds = time.perf_counter() - start

    model = nn.Sequential(nn.Linear(dim, classes)).double()
    w = theta.view(classes, dim + 1)
    with torch.no_grad():
        model[0].weight.copy_(w[:, :dim])
        model[0].bias.copy_(w[:, dim])
    layers = find_tracked_layers(model, include=[r".*"])
    assert [layer.name for layer in layers] == ["0"]
    task = ClassificationTask()
    # 20 passes over the training set: 20 sampled labels per example for S and Lambda each.
    loader = [(x[i:i + 50], y[i:i + 50]) for i in range(0, n, 50)] * 20
    factors = fit_factors(model, task, loader, layers,
                          FactorArguments(strategy="ekfac", fisher="true", seed=0, progress=False))
    q_grads = sequence_gradients(model, task, (xq, yq), layers)
    d_grads = sequence_gradients(model, task, (x, y), layers)
    query = precondition(q_grads, ScoreArguments(method="single-stage", damping=reg),
                         ft_factors=factors)
    predicted = -score_gradients(query, d_grads).double() / n

    # References that do not use the engine: exact Hessian and plain gradient dot product, with
    # per-example gradients from torch.func (same [W | b] layout as the engine's G).
    def ce(theta_, xi, yi):
        return -_log_likelihood(theta_, xi[None], yi[None])[0]

    per_example = torch.func.vmap(torch.func.grad(ce), in_dims=(None, 0, 0))
    gq, gd = per_example(theta, xq, yq), per_example(theta, x, y)
    torch.testing.assert_close(d_grads["0"].flatten(1).double(), gd, rtol=1e-4, atol=1e-6)
    hessian = torch.func.hessian(_objective)(theta, x, y, reg)  # includes + reg I
    exact_pred = -(torch.linalg.solve(hessian, gq.T).T @ gd.T) / n
    dot_pred = -(gq @ gd.T) / n

    def slope(pred):  # least squares actual ~ slope * predicted, pooled over queries
        return float((pred * actual).sum() / pred.square().sum())

    accuracy = float(((x @ w[:, :dim].T + w[:, dim]).argmax(1) == y).double().mean())
    print(f"\n[loo] n={n}, d={dim}, C={classes}, reg={reg}; {n} Newton retrainings in "
          f"{loo_seconds:.1f}s; train accuracy {accuracy:.2f}")
    print("query  Pearson(-I/n, actual LOO delta): EK-FAC   exact H   gradient-dot")
    ek, ex, dot = [], [], []
    for j in range(len(xq)):
        ek.append(_pearson(predicted[j], actual[j]))
        ex.append(_pearson(exact_pred[j], actual[j]))
        dot.append(_pearson(dot_pred[j], actual[j]))
        print(f"q{j}                                    {ek[-1]:.4f}   {ex[-1]:.4f}    {dot[-1]:.4f}")
    print(f"slope of actual on predicted: EK-FAC {slope(predicted):.3f}, exact H "
          f"{slope(exact_pred):.3f}, gradient-dot {slope(dot_pred):.3f}; "
          f"{time.perf_counter() - start:.1f}s in all")

    assert min(ex) >= 0.95, ex  # the harness itself: first-order theory holds at this n
    assert min(ek) >= 0.9, ek
    assert 0.75 < slope(predicted) < 1.33, slope(predicted)  # sign, 1/n and damping scale right

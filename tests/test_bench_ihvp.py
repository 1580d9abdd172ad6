"""Smoke test of benchmarks/ihvp_fidelity.py: its --quick run, in-process, checked on numbers.

The bounds were measured on the quick configuration: with seed 0 (the test's) EK-FAC's Spearman is
0.52 against the exact full-matrix scores and 0.91 against the exact block-diagonal ones, identity's
0.13, CG's after 40 iterations 0.999; seeds 1 and 2 stay within the bounds too (EK-FAC 0.67 / 0.49
and 0.96 / 0.88).
"""

from __future__ import annotations

import pytest

from engine import FactorArguments, LanguageModelingTask, fit_factors, flatten

from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("ihvp_fidelity")


@pytest.mark.slow
def test_quick_run_reproduces_the_fidelity_ordering(bench, tmp_path):
    out = tmp_path / "x.md"
    result = bench.main(["--quick", "--threads", "1", "--out", str(out)])
    full = {r.method: r.metrics["full"] for r in result["rows"]}
    block = {r.method: r.metrics["block"] for r in result["rows"]}

    # The harness: autograd Gauss-Newton products equal the explicit H, the flat layout equals
    # the engine's gradients, and CG on those products converges to the explicit solve.
    assert result["product_error"] < 1e-7
    assert result["layout_error"] < 1e-10
    assert full["exact, full H (Cholesky)"]["spearman"] == pytest.approx(1.0)
    cg = max((m for m in full if m.startswith("CG")), key=lambda m: int(m.split()[1]))
    assert full[cg]["spearman"] > 0.99 and full[cg]["pearson"] > 0.99
    assert full["CG, 5 iterations"]["spearman"] < full[cg]["spearman"]

    # The approximations: EK-FAC is close to the exact per-layer (block-diagonal) solve, no worse
    # than K-FAC there and better than the diagonal, and far better than no curvature at all.
    assert block["EK-FAC"]["spearman"] > 0.85
    assert block["EK-FAC"]["spearman"] > block["K-FAC"]["spearman"] - 0.02
    assert block["EK-FAC"]["spearman"] > block["diagonal"]["spearman"]
    assert full["EK-FAC"]["spearman"] > 0.45
    assert full["EK-FAC"]["spearman"] > full["identity (gradient dot)"]["spearman"] + 0.25
    assert full["exact, block-diagonal H"]["spearman"] > full["EK-FAC"]["spearman"]
    assert result["damping"] > 0
    # More damping brings every method closer to the exact solve (H's spectrum is heavy-tailed).
    assert [r["factor"] for r in result["sweep"]] == [0.1, 0.3, 1.0]
    assert result["sweep"][-1]["ekfac"] > result["sweep"][0]["ekfac"]
    assert result["sweep"][0]["ekfac"] == pytest.approx(full["EK-FAC"]["spearman"], abs=1e-9)

    # The reference is the matrix the engine estimates: the engine's sampled-label diagonal of the
    # Fisher converges to diag(H) (measured: 9% off with 8 draws per document, 4% with 32).
    pb = result["problem"]

    def sampled_diagonal_error(draws: int) -> float:
        fitted = fit_factors(pb.model, LanguageModelingTask(), pb.doc_batches, pb.layers, FactorArguments(
            strategy="diagonal", label_samples=draws, seed=5, progress=False))
        diag = flatten({name: f.diagonal.unsqueeze(0) for name, f in fitted.layers.items()})[0]
        return float((diag - pb.H.diagonal()).norm() / pb.H.diagonal().norm())

    coarse, fine = sampled_diagonal_error(8), sampled_diagonal_error(32)
    assert fine < 0.08 and fine < coarse

    text = out.read_text()
    assert "| method | Pearson | Spearman |" in text
    assert "| EK-FAC | " in text and "| LiSSA, 50 steps" in text
    assert "--quick" in text and "EK-FAC reaches Spearman" in text
    assert "| lambda / mean eigenvalue |" in text

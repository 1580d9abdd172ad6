"""benchmarks/vs_kronfluence.py without Kronfluence installed (CI): one line saying how to install it.

With Kronfluence installed the benchmark itself checks the agreement it prints (docs/engine_speed.md)."""

from __future__ import annotations

from conftest import load_benchmark


def test_vs_kronfluence_says_how_to_install_kronfluence_when_it_is_missing(monkeypatch, capsys):
    bench = load_benchmark("vs_kronfluence")
    monkeypatch.setattr(bench, "kronfluence_installed", lambda: False)
    assert bench.main(["--sizes", "tiny"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "not installed" in out and "pip install --no-deps kronfluence" in out


def test_the_shared_labels_are_the_ones_both_tools_are_given():
    """The engine's side of the job reads the shared sampled labels when it samples, the data's otherwise."""
    import torch

    bench = load_benchmark("vs_kronfluence")
    size = bench.SIZES["tiny"]
    model = bench.build_model(size, 0)
    docs = bench.make_documents(model, size, 8, 0)
    batch = bench.collate(docs)
    task = bench.SharedLabels()
    with torch.no_grad():
        sampled = task.sequence_losses(model, batch, sample=True)
        data = task.sequence_losses(model, batch)
        ref_sampled = torch.stack([bench.summed_loss(model, bench.collate([d]), "sampled") for d in docs])
        ref_data = torch.stack([bench.summed_loss(model, bench.collate([d]), "labels") for d in docs])
    torch.testing.assert_close(sampled, ref_sampled, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(data, ref_data, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(sampled, data)

"""Smoke test of benchmarks/throughput.py: the quick run on the tiny demo study writes its tables,
and the numbers in them hold together; the index helpers find vectors planted for our own query."""

from __future__ import annotations

import math
import re

import faiss
import numpy as np
import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    """The script as a module; faiss's thread count restored (torch's is, by conftest)."""
    faiss_threads = faiss.omp_get_max_threads()
    try:
        yield load_benchmark("throughput")
    finally:
        faiss.omp_set_num_threads(faiss_threads)


def table(markdown: str, first_header: str) -> list[list[str]]:
    """Body cells of the markdown table whose first header cell is ``first_header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append([cell.strip() for cell in line.strip("|").split("|")])
    return body


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("x%"))


@pytest.mark.slow
def test_quick_run_writes_consistent_tables(bench, tiny_study, tmp_path):
    out = tmp_path / "t.md"
    assert bench.main(["--study", str(tiny_study), "--quick", "--threads", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Throughput") and "## Reading" in text and "CPU cores" in text

    stages = table(text, "stage")
    assert [row[0].split()[0] for row in stages] == ["(a)", "(b)", "(c1)", "(c2)", "(d)"]
    for name, secs, docs_s, tokens_s, ratio in stages:
        assert number(secs) > 0 and number(docs_s) > 0 and number(tokens_s) > number(docs_s), name
        assert math.isfinite(number(ratio)) and number(ratio) > 0, name
    assert stages[0][4] == "1.00x"

    prepare, rescoring = (number(row[1]) for row in table(text, "per query, whatever the corpus size"))
    assert prepare > 0 and rescoring > 0
    sizes = table(text, "documents")
    dim = int(number(re.search(r"whitened index dimension ([\d,]+)", text).group(1)))
    assert dim == 8 * 1024  # tiny study: 8 tracked layers, eigen_dim 1024 kept per layer
    assert [int(number(row[0])) for row in sizes] == [500, 2000]
    for n, kind, build, mib, search_ms, planted, total, share in sizes:
        assert kind == "flat" and planted == "yes"
        assert number(build) >= 0 and number(search_ms) > 0
        assert number(mib) == pytest.approx(number(n) * dim * 4 / 2**20, rel=0.01)
        assert number(total) == pytest.approx(prepare + rescoring + number(search_ms) / 1e3, abs=0.02)
        assert 0 <= number(share) <= 100


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_index_helpers_find_planted_vectors(bench, kind):
    dim, n, k = 32, 3000, 5
    query = np.zeros(dim, np.float32)
    query[:4] = 1.0  # <q, 10q> = 40; a random row's <q, v> ~ N(0, 4), below 10 over 3000 rows
    planted = {1234: 10 * query, 77: -10 * query}
    vectors = bench.synthetic_vectors(n, dim, np.random.default_rng(0), planted)
    assert vectors.shape == (n, dim) and np.array_equal(vectors[77], -10 * query)
    index, build_s = bench.build_index(vectors, kind)
    assert index.kind == kind and index.ntotal == n and build_s > 0
    search_s, found = bench.search(index, query, k, repeats=2)
    assert search_s > 0 and found.proponent_ids.shape == (1, k)
    assert found.proponent_ids[0, 0] == 1234 and found.opponent_ids[0, 0] == 77
    assert found.proponent_projected[0, 0] == pytest.approx(40.0)
    assert found.opponent_projected[0, 0] == pytest.approx(-40.0)
    stored = len(faiss.serialize_index(index.index))  # what the index really holds, plus headers
    assert bench.index_bytes(index) == pytest.approx(stored, rel=0.02)

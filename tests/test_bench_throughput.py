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
    for _n, kind, build, mib, search_ms, planted, total, share in sizes:
        assert kind == "flat scan" and planted == "yes"
        assert number(build) >= 0 and number(search_ms) > 0 and number(mib) == 0  # a scan adds no file
        assert number(total) == pytest.approx(prepare + rescoring + number(search_ms) / 1e3, abs=0.02)
        assert 0 <= number(share) <= 100


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_index_helpers_find_planted_vectors(bench, kind, tmp_path):
    dim, n, k = 32, 3000, 5
    query = np.zeros(dim, np.float32)
    query[:4] = 1.0  # <q, 10q> = 40; a random row's <q, v> ~ N(0, 4), below 10 over 3000 rows
    planted = {1234: 10 * query, 77: -10 * query}
    vectors = bench.synthetic_vectors(n, dim, np.random.default_rng(0), planted)
    assert vectors.shape == (n, dim) and np.array_equal(vectors[77], -10 * query)
    search, build_s, size = bench.build_index(vectors, kind, tmp_path)
    assert build_s > 0 and (size == 0 if kind == "flat" else size >= n * 32 * 4)  # ivf: the coordinates on disk
    found = search(query[None], k)
    assert found.proponent_ids.shape == (1, k)
    assert found.proponent_ids[0, 0] == 1234 and found.opponent_ids[0, 0] == 77
    assert found.proponent_projected[0, 0] == pytest.approx(40.0)
    assert found.opponent_projected[0, 0] == pytest.approx(-40.0)

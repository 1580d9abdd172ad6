"""A million-document study in miniature: the haystack, the staged index, growing a study.

The staged index (principal coordinates in faiss inverted lists on disk, candidates re-ranked with their full rows) must
return what an exhaustive scan of the stored vectors returns, and its build must read the
vectors a shard at a time.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

import engine.study.vectors as vectors_module
from engine.methods import PROBES
from engine.query import QueryEngine, index_vectors
from engine.search import Band, CodeScan, IVFLists, PCABasis, TopK, rerank_block, scan, staged_search
from engine.study import Stage, Study, StudyError, StudyIndex, layout, open_study
from precompute import haystack
from precompute.demo import build_demo, tiny_recipe
from precompute.world import World, build_world, mentions

EXTRA = 3000


# -- the search itself, against brute force ------------------------------------------------------
def _brute(rows: np.ndarray, q: np.ndarray, k: int, weights=None):
    scores = rows @ q.T * (1 if weights is None else weights[:, None])
    return np.argsort(-scores, axis=0, kind="stable")[:k].T, np.argsort(scores, axis=0, kind="stable")[:k].T


def test_scan_finds_both_signs_over_chunks():
    rng = np.random.default_rng(0)
    rows, q, w = rng.standard_normal((1000, 12)).astype(np.float32), rng.standard_normal((3, 12)), rng.random(1000)
    chunks = [(s, rows[s:s + 128]) for s in range(0, 1000, 128)][::-1]  # any order of chunks
    found = scan(chunks, q, 7, weights=w.astype(np.float32))
    pro, opp = _brute(rows, q.astype(np.float32), 7, w.astype(np.float32))
    assert (found.proponent_ids == pro).all() and (found.opponent_ids == opp).all()
    exact = rows @ q.T.astype(np.float32) * w[:, None].astype(np.float32)
    assert np.allclose(found.proponent_projected, np.take_along_axis(exact.T, pro, 1), rtol=1e-5)
    assert (found.opponent_projected < 0).all() and (np.diff(found.opponent_projected, axis=1) >= 0).all()


def test_topk_keeps_k_and_breaks_ties_by_id():
    top = TopK(1, 2)
    top.add(np.array([[1.0], [3.0], [3.0]]), np.array([5, 9, 2]))
    found = top.result()
    assert found.proponent_ids.tolist() == [[2, 9]] and found.opponent_ids.tolist() == [[5, 2]]


def test_pca_basis_is_the_principal_subspace():
    rng = np.random.default_rng(1)
    x = ((rng.standard_normal((500, 3)) + 5) @ rng.standard_normal((3, 20))).astype(np.float32)  # rank 3, a mean
    basis = PCABasis.fit(x, 3)
    assert np.allclose(basis.components.T @ basis.components, np.eye(3), atol=1e-5)
    back = basis.transform(x) @ basis.components.T + basis.mean
    assert np.abs(back - x).max() < 1e-3 * np.abs(x).max()  # a rank-3 cloud is kept whole
    q = rng.standard_normal((2, 20)).astype(np.float32)
    coarse, offset = basis.queries(q)
    assert np.allclose(basis.transform(x) @ coarse.T + offset, x @ q.T, rtol=1e-3, atol=1e-2)


def test_pca_basis_is_not_owned_by_a_few_huge_rows():
    """The directions are fit on unit rows: ten rows of norm 1000 along one axis do not take the
    first component from the 990 rows that spread over the other nine."""
    rng = np.random.default_rng(5)
    x = np.zeros((1000, 10), np.float32)
    x[:990, 1:] = rng.standard_normal((990, 9)) * np.linspace(3, 1, 9)
    x[990:, 0] = 1000 * rng.choice([-1, 1], 10)
    first = PCABasis.fit(x, 1).components[:, 0]
    assert abs(first[0]) < 0.1 and abs(first[1]) > 0.9, first


def test_a_basis_fit_on_queries_keeps_the_ranking_a_basis_fit_on_documents_loses():
    """Documents spread most along dims 0-7, but queries (and the differences between documents
    that rank them) live in dims 8-15: the documents' principal directions miss them, the queries'
    keep them whole. Uncentred: no mean, no offset in the coarse score."""
    rng = np.random.default_rng(7)
    docs = np.concatenate([rng.standard_normal((3000, 8)) * 10, rng.standard_normal((3000, 8))], 1)
    queries = np.concatenate([np.zeros((200, 8)), rng.standard_normal((200, 8))], 1)
    test = np.concatenate([np.zeros((20, 8)), rng.standard_normal((20, 8))], 1).astype(np.float32)
    truth = np.argsort(-(docs @ test.T), 0)[:10].T
    recall = {}
    for label, basis in (("queries", PCABasis.fit_queries(queries, docs, 8)), ("documents", PCABasis.fit(docs, 8))):
        coarse, offset = basis.queries(test)
        top = np.argsort(-(basis.transform(docs) @ coarse.T + offset), 0)[:10].T
        recall[label] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, truth)])
    assert recall["queries"] >= 0.99 and recall["documents"] < 0.3, recall
    # three queries give three directions; the documents' leading ones (dims 0-7) fill the other five
    filled = PCABasis.fit_queries(queries[:3], docs, 8)
    assert not filled.mean.any() and np.allclose(filled.components.T @ filled.components, np.eye(8), atol=1e-5)
    span = filled.components[:, :3]
    assert np.allclose(span @ (span.T @ queries[:3].T), queries[:3].T, atol=1e-4)
    assert np.linalg.norm(filled.components[:8, 3:], axis=0).min() > 0.99


def test_residual_sketch_estimates_what_the_basis_leaves_out(tmp_path):
    """The sketch coordinates are C (x - V V^T x) for the stored count sketch C; inner products of
    coarse coordinates (principal, then sketch) estimate <q, w> without bias: over many draws of the
    sketch their mean error is small against one draw's, and a basis without a sketch keeps only the
    principal part; a sketch saved and loaded serves the same coordinates."""
    rng = np.random.default_rng(0)
    dim = 64
    basis = PCABasis.fit_queries(rng.standard_normal((6, dim)).astype(np.float32),
                                 rng.standard_normal((40, dim)).astype(np.float32), 4)
    q, w = rng.standard_normal((2, dim)).astype(np.float32)
    sketched = basis.with_sketch(16, seed=3)
    assert sketched.dims == 20 and basis.with_sketch(0).sketch is None
    c = np.zeros((16, dim), np.float32)
    c[sketched.sketch.buckets, np.arange(dim)] = sketched.sketch.signs
    residual = w - basis.components @ (basis.components.T @ w)
    assert np.allclose(sketched.transform(w[None])[0], np.concatenate([basis.components.T @ w, c @ residual]),
                       atol=1e-5)
    principal = float((basis.components.T @ q) @ (basis.components.T @ w))
    assert np.isclose(float(basis.queries(q[None])[0][0] @ basis.transform(w[None])[0]), principal, atol=1e-4)

    def errors(size: int) -> np.ndarray:
        draws = [basis.with_sketch(size, seed) for seed in range(400)]
        return np.array([float(b.queries(q[None])[0][0] @ b.transform(w[None])[0]) - float(q @ w) for b in draws])

    small, large = errors(16), errors(64)
    for e in (small, large):
        assert abs(e.mean()) < 4 * e.std() / np.sqrt(len(e))  # unbiased
    assert large.std() < 0.65 * small.std()  # the error shrinks as 1 / sqrt(k): 0.5 expected
    sketched.save(tmp_path / "basis.safetensors")
    loaded = PCABasis.load(tmp_path / "basis.safetensors")
    assert loaded.dims == 20 and np.array_equal(loaded.transform(w[None]), sketched.transform(w[None]))
    basis.save(tmp_path / "plain.safetensors")
    assert PCABasis.load(tmp_path / "plain.safetensors").sketch is None  # bases saved before serve as they did


def test_the_sketch_is_sized_by_the_corpus_unless_the_study_names_one():
    from engine.study.index import SKETCH, SKETCH_LIMIT, IndexSettings

    assert IndexSettings().sketch_size(32_200) == SKETCH == 2048
    assert IndexSettings().sketch_size(SKETCH_LIMIT) == SKETCH and IndexSettings().sketch_size(SKETCH_LIMIT + 1) == 0
    assert IndexSettings(sketch=0).sketch_size(1000) == 0 and IndexSettings(sketch=512).sketch_size(10**7) == 512
    with pytest.raises(ValueError, match="index_sketch >= 0"):
        IndexSettings(sketch=-1)


def _lists(tmp_path, rows: np.ndarray, basis: PCABasis, nlist: int, nprobe: int) -> IVFLists:
    coordinates = basis.transform(rows)
    blocks = ((start, coordinates[start:start + 300]) for start in range(0, len(rows), 300))
    return IVFLists.build(tmp_path / "ivf", coordinates, blocks, nlist, nprobe)


def test_staged_search_equals_the_scan_when_every_list_is_visited(tmp_path):
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((400, 16)).astype(np.float32)
    q = rng.standard_normal((2, 16)).astype(np.float32)
    basis = PCABasis.fit(rows, 16)
    lists = _lists(tmp_path, rows, basis, nlist=8, nprobe=8)
    for weights in (None, rng.random(400).astype(np.float32) + 0.5):
        staged = staged_search(lists, basis, lambda ids: rows[ids], q, 10, rerank=400, weights=weights)
        exact = scan([(0, rows)], q, 10, weights=weights)
        assert (staged.proponent_ids == exact.proponent_ids).all()
        assert (staged.opponent_ids == exact.opponent_ids).all()
        assert np.allclose(staged.proponent_projected, exact.proponent_projected, rtol=1e-5)


def test_staged_search_re_ranks_with_full_rows(tmp_path):
    """The coarse coordinates only pick candidates; the scores served are those of the full rows."""
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((2000, 64)).astype(np.float32)
    q = rng.standard_normal((1, 64)).astype(np.float32)
    basis = PCABasis.fit(rows, 8)
    staged = staged_search(_lists(tmp_path, rows, basis, 16, 4), basis, lambda ids: rows[ids], q, 5, rerank=50)
    full = (rows @ q.T)[:, 0]
    assert np.allclose(staged.proponent_projected[0], full[staged.proponent_ids[0]], rtol=1e-5)
    assert (np.diff(staged.proponent_projected[0]) <= 0).all()


def test_inverted_lists_visit_a_share_of_the_corpus_on_disk(tmp_path):
    """A query reads nprobe lists per sign, memory-mapped from the lists file (which may move); a
    clustered corpus keeps the weighted top-10 of the scan; fewer documents than k widen the visit."""
    import faiss

    rng = np.random.default_rng(4)
    centres = rng.standard_normal((40, 24)).astype(np.float32)
    rows = (centres[rng.integers(0, 40, 6000)] + 0.3 * rng.standard_normal((6000, 24))).astype(np.float32)
    weights = np.exp(0.5 * rng.standard_normal(6000)).astype(np.float32)
    basis = PCABasis.fit(rows, 24)
    lists = _lists(tmp_path, rows, basis, nlist=64, nprobe=8)
    (tmp_path / "ivf").rename(tmp_path / "moved")
    lists = IVFLists.load(tmp_path / "moved", nprobe=8)
    assert type(faiss.downcast_InvertedLists(lists.ivf.invlists)).__name__ == "OnDiskInvertedLists"
    q = rows[rng.choice(6000, 8)] + 0.5 * rows[rng.choice(6000, 8)]  # shaped like documents, as queries are
    coarse, offset = basis.queries(q)
    visited = lists._visit(coarse[0], 10)[0]
    assert 10 <= len(visited) < len(rows) / 2
    found, truth = lists.search(coarse, offset, 10, weights), scan([(0, basis.transform(rows))], coarse, 10,
                                                                     weights, offset)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.proponent_ids, truth.proponent_ids)])
    assert recall >= 0.9, recall
    assert len(lists.search(coarse[:1], offset[:1], 3000).proponent_ids[0]) == 3000  # widened past nprobe


def test_lists_are_placed_by_the_principal_coordinates_not_the_sketch(tmp_path):
    """A query inside the basis visits lists by where documents lie in it. Clustered on every coarse
    coordinate, the lists follow the residual sketch (95% of a document's energy here, noise to this
    query), and a share of them no longer holds the query's top 10."""
    rng = np.random.default_rng(5)
    n, p, d = 6000, 24, 400
    centres = rng.standard_normal((40, p)).astype(np.float32)
    rows = np.concatenate([centres[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, p)),
                           1.2 * rng.standard_normal((n, d - p))], 1).astype(np.float32)
    basis = PCABasis(np.zeros(d, np.float32), np.eye(d, p, dtype=np.float32)).with_sketch(64)
    q = np.zeros((16, d), np.float32)
    q[:, :p] = rows[rng.choice(n, 16), :p]
    coarse, offset = basis.queries(q)
    coordinates = basis.transform(rows)
    truth = scan([(0, coordinates)], coarse, 10, None, offset)

    def recall(directions: int | None) -> tuple[float, float]:
        blocks = ((start, coordinates[start:start + 300]) for start in range(0, n, 300))
        lists = IVFLists.build(tmp_path / f"ivf-{directions}", coordinates, blocks, 64, 4, directions=directions)
        assert directions is None or not lists.centroids[:, directions:].any()
        found = lists.search(coarse, offset, 10)
        return tuple(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(f, t)])
                     for f, t in ((found.proponent_ids, truth.proponent_ids), (found.opponent_ids, truth.opponent_ids)))

    assert min(recall(p)) >= 0.85  # measured 1.00 and 0.89
    assert max(recall(None)) <= 0.4  # measured 0.16 and 0.10


def test_a_code_scan_finds_the_weighted_top10_of_both_signs(tmp_path):
    """Weights folded into 4-bit codes: among its top 200 of 20,000 structureless Gaussian documents
    (the hardest case for product quantisation), the scan holds most of the exact top 10 of ``<q, row> *
    weight`` for both signs (0.89; 0.18 when the codes lack the weights); written and read back, it
    scans the same; it refuses blocks out of order and a centred basis (whose offset no code carries)."""

    rng = np.random.default_rng(4)
    rows = (rng.standard_normal((20_000, 32)) * np.linspace(2, 0.5, 32)).astype(np.float32)
    weights = np.exp(rng.normal(0, 1, 20_000)).astype(np.float32)  # a heavy tail, as inverse norms have
    queries = rng.standard_normal((8, 32)).astype(np.float32)
    built = CodeScan.train(rows[::10] * weights[::10, None], weights)
    for start in range(0, 20_000, 4096):
        built.add(start, rows[start:start + 4096])
    built.save(tmp_path / "scan.faiss")
    loaded = CodeScan.load(tmp_path / "scan.faiss", CodeScan.weights_digest(weights))
    assert loaded.digest == built.digest != CodeScan.weights_digest(weights * 2)
    truth = scan([(0, rows)], queries, 10, weights)
    found = loaded.search(queries, np.zeros(8, np.float32), 200)
    again = built.search(queries, np.zeros(8, np.float32), 200)
    assert (found.proponent_ids == again.proponent_ids).all()
    for mine, exact in ((found.proponent_ids, truth.proponent_ids), (found.opponent_ids, truth.opponent_ids)):
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(mine, exact)])
        assert recall >= 0.85, recall
    assert (found.proponent_projected[:, 0] > 0).all() and (found.opponent_projected[:, 0] < 0).all()
    with pytest.raises(ValueError, match="in order"):
        CodeScan.train(rows[:1000], weights).add(5, rows[:10])
    half = CodeScan.train(rows[:1000], weights)
    half.add(0, rows[:10])
    with pytest.raises(ValueError, match=f"10 documents encoded for {len(weights)} weights"):
        half.save(tmp_path / "half.faiss")  # a scan missing documents is never written
    assert not (tmp_path / "half.faiss").exists()
    with pytest.raises(ValueError, match="uncentred"):
        loaded.search(queries, np.ones(8, np.float32), 10)


def test_the_band_is_always_scored(tmp_path):
    """A raw ranking is made of a few huge rows that point anywhere: the lists a query visits miss
    them, the band (documents of largest weight x norm) brings them back."""
    rng = np.random.default_rng(6)
    centres = rng.standard_normal((30, 16)).astype(np.float32)
    rows = (centres[rng.integers(0, 30, 3000)] + 0.3 * rng.standard_normal((3000, 16))).astype(np.float32)
    heavy = rng.choice(3000, 20, replace=False)
    rows[heavy] = 200 * rng.standard_normal((20, 16))
    basis = PCABasis.fit(rows, 16)
    lists = _lists(tmp_path, rows, basis, nlist=32, nprobe=1)
    q = rows[rng.choice(np.setdiff1d(np.arange(3000), heavy), 12)]
    norms = np.linalg.norm(rows, axis=1)
    ids = np.sort(np.argsort(-norms)[:40])
    band = Band(ids, basis.transform(rows[ids]))
    truth = scan([(0, rows)], q, 10)
    without = staged_search(lists, basis, lambda i: rows[i], q, 10, rerank=100)
    served = staged_search(lists, basis, lambda i: rows[i], q, 10, rerank=100, band=band)
    recall = [np.mean([len(set(a) & set(b)) / 10 for a, b in zip(f.proponent_ids, truth.proponent_ids)])
              for f in (without, served)]
    assert recall[0] < 0.5 and recall[1] >= 0.95, recall
    assert len(np.unique(served.proponent_ids[0])) == 10  # a band document in a visited list counts once


def test_lists_are_ranked_by_direction_times_their_largest_document(tmp_path):
    """Ranked by direction alone, the visited lists miss a raw ranking's best documents when norms
    vary (a moderately aligned heavy document outscores a well-aligned light one); ranked by direction
    times each list's largest weight x norm, the same number of lists finds them. No band here."""
    rng = np.random.default_rng(8)
    centres = rng.standard_normal((40, 16)).astype(np.float32)
    rows = centres[rng.integers(0, 40, 6000)] + 0.8 * rng.standard_normal((6000, 16)).astype(np.float32)
    rows *= np.exp(2.0 * rng.standard_normal((6000, 1))).astype(np.float32)  # heavy-tailed norms
    basis = PCABasis.fit(rows, 16)
    lists = _lists(tmp_path, rows, basis, nlist=64, nprobe=4)
    q = rows[rng.choice(6000, 16)] / np.linalg.norm(rows[rng.choice(6000, 16)], axis=1, keepdims=True)
    coarse, offset = basis.queries(q)
    truth = scan([(0, basis.transform(rows))], coarse, 10, None, offset)
    sizes = lists.list_sizes(np.linalg.norm(rows, axis=1))
    assert sizes.shape == (64,) and sizes.max() == pytest.approx(np.linalg.norm(rows, axis=1).max(), rel=1e-5)
    recall = [np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.proponent_ids, truth.proponent_ids)])
              for found in (lists.search(coarse, offset, 10), lists.search(coarse, offset, 10, list_sizes=sizes))]
    assert recall[1] >= recall[0] + 0.2, recall  # measured 0.33 -> 0.62 with 4 of 64 lists


# -- the haystack --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_world() -> World:
    return build_world(seed=1, n_people=12, n_towns=6, n_orgs=4, n_documents=120)


def test_haystack_never_names_a_world_entity(small_world):
    names = haystack.Names.outside(small_world)
    docs = list(haystack.documents(0, 0, 4000, names))
    assert {d["kind"] for d in docs} == set(haystack.KINDS)
    entities = haystack.named_entities(small_world)
    offending = [(d["text"], e) for d in docs for e in entities if mentions(d["text"], e)]
    assert offending == []
    # ... while looking like the world: biographies in the world's own wordings
    assert sum(" was born in " in d["text"] for d in docs) > 200


def test_haystack_is_prefix_stable(small_world):
    names = haystack.Names.outside(small_world)
    assert list(haystack.documents(5, 0, 50, names))[30:] == list(haystack.documents(5, 30, 50, names))
    assert list(haystack.documents(5, 0, 20, names)) != list(haystack.documents(6, 0, 20, names))


# -- a staged study, built from the shards ---------------------------------------------------------
def _staged_recipe():
    recipe = tiny_recipe()
    return replace(recipe, influence=replace(recipe.influence, index="ivf", index_dims=128, rerank=800,
                                             index_sample=1024, index_sketch=512))


@pytest.fixture(scope="module")
def staged(tiny_study, tmp_path_factory):
    """The tiny demo plus EXTRA haystack documents, indexed by the staged (ivf) index; the loader
    is spied on: how many rows are decoded at once."""
    root = tmp_path_factory.mktemp("haystack") / "study"
    shutil.copytree(tiny_study, root)
    decoded = []
    real = vectors_module.decode_vectors

    def spy(stored, dtype):
        decoded.append(len(stored))
        return real(stored, dtype)

    vectors_module.decode_vectors = spy
    try:
        build_demo(root, seed=3, recipe=_staged_recipe(), progress=False, extra_documents=EXTRA)
    finally:
        vectors_module.decode_vectors = real
    return Study(root), decoded


def _pretrain_facts(study: Study, count: int) -> list[dict]:
    facts = [json.loads(line) for line in study.path(layout.FACTS).read_text().splitlines()]
    return [f for f in facts if f["split"] == "pretrain_only"][:count]


def test_staged_index_serves_the_scan_top10(staged):
    study, _ = staged
    record = study.manifest()["stages"][Stage.INDEX]["search"]
    assert record["kind"] == "ivf" and record["documents"] > EXTRA
    assert "projected" not in record and set(record["recall"]) == {"whitened"}  # one kind indexed
    assert min(record["recall"]["whitened"][f"{ranking}at_10"] for ranking in ("", "cosine_")) >= 0.95, record["recall"]
    index = StudyIndex.of(study)
    assert (study.path(layout.index_file("whitened", "ivf")) / "lists.ivfdata").exists()  # on disk, memory-mapped
    assert record["whitened"]["queries"] > 0, record["whitened"]
    engine = QueryEngine(open_study(study.root))
    facts = _pretrain_facts(study, 10)
    for name, method in PROBES.items():
        # the queries the index serves: questions (not records, which the basis was fit on) in the template
        query = engine.preconditioned([engine.study.prompts.prompt(f["question"]) for f in facts],
                                      [f["response"] for f in facts], method)
        queries = index_vectors(name, query, engine.study.whitening, engine.study.projector).numpy()
        unit = (1 / np.load(study.path(layout.INDEX_NORMS))).astype(np.float32)
        default = engine.search_weights(method, engine.normalization(method), name)
        for weights in (None, unit, default):  # the dot and cosine rankings of the rows, the default's
            served, truth = index.search(name, queries, 10, weights), index.searches[name].scan(queries, 10, weights)
            same = [len(set(a) & set(b)) / 10 for a, b in zip(served.proponent_ids, truth.proponent_ids)]
            assert (served.proponent_ids == truth.proponent_ids).all(), (name, weights is None, same)
            assert np.allclose(served.proponent_projected, truth.proponent_projected, rtol=1e-4)
            if weights is None:  # the sketch's error grows with a row's residual, and a raw ranking is made
                # of the largest rows: its opponents are found, not always all of them (one of ten missed here)
                found = [len(set(a) & set(b)) / 10 for a, b in zip(served.opponent_ids, truth.opponent_ids)]
                assert min(found) >= 0.9 and np.mean(found) >= 0.98, (name, found)
                continue
            assert (served.opponent_ids == truth.opponent_ids).all(), name


def test_the_default_ranking_is_served_by_a_code_scan_of_every_document(staged):
    """The index stage folds the default ranking's weights into product-quantised codes of every
    document's coordinates (320 bytes a document at 128 principal and 512 sketch coordinates: 4 bits
    each); they serve that ranking, recorded with its weights' digest, and are checksummed with the study."""
    study, _ = staged
    record = study.manifest()["stages"][Stage.INDEX]["search"]["whitened"]
    assert record["dims"] == 640 and record["sketch"] == 512
    assert record["scan"]["ranking"] == "gradient" and record["scan"]["bytes_per_document"] == 320
    path = study.path(layout.index_file("whitened", "scan"))
    assert layout.index_file("whitened", "scan") in study.manifest()["stages"][Stage.INDEX]["files"]
    documents = study.manifest()["stages"][Stage.INDEX]["search"]["documents"]
    assert documents * 320 <= path.stat().st_size < documents * 320 + 2**20  # codes, plus codebooks and header
    engine = QueryEngine(open_study(study.root))
    search = engine.study.index.searches["whitened"]
    default = engine.search_weights("multi-stage", engine.normalization("multi-stage"), "whitened")
    assert not search.scans(default)  # every list is visited: their exact coordinates serve
    search.lists.nprobe = 4  # of about 220 lists: as a query of a large corpus visits a share of them
    search._scanned.clear()
    assert search.scans(default)
    assert not search.scans(engine.search_weights("multi-stage", engine.normalization("multi-stage", "none"),
                                                  "whitened"))
    facts = _pretrain_facts(study, 10)
    query = engine.preconditioned([engine.study.prompts.prompt(f["question"]) for f in facts],
                                  [f["response"] for f in facts], "multi-stage")
    queries = index_vectors("whitened", query, engine.study.whitening, engine.study.projector).numpy()
    served, truth = search.search(queries, 10, default), search.scan(queries, 10, default)
    assert (served.proponent_ids == truth.proponent_ids).all() and (served.opponent_ids == truth.opponent_ids).all()
    search.code_scan, search._scanned = CodeScan(search.code_scan.index, "other"), []  # the lists alone
    search.band_size, search._rankings = 0, []
    missed = search.search(queries, 10, default)  # 0.8 of the top 10 when written
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(missed.proponent_ids, truth.proponent_ids)]) < 0.95


def test_an_index_fit_by_an_older_msif_is_refused_with_the_rebuild_command(staged):
    """An index whose coarse basis was fit on documents (or lists trained on raw rows) serves templated
    queries badly: opening one says so and names the command that rebuilds the index stage."""
    study, _ = staged
    record = copy.deepcopy(study.manifest()["stages"][Stage.INDEX]["search"])
    del record["whitened"]["fit"]
    with pytest.raises(StudyError, match="fit on documents rather than queries") as refused:
        StudyIndex(study, record)
    assert study.rebuild_command() in str(refused.value)


def test_index_build_reads_one_shard_at_a_time(staged):
    """Scans decode a shard at a time; the recall it measures re-ranks candidates a block at a time
    (``rerank_block`` rows, a cache-sized block): the build never decodes the corpus whole."""
    study, decoded = staged
    shard = study.manifest()["stages"][Stage.PROJECTION]["vectors"]["shard_size"]
    documents = study.manifest()["stages"][Stage.INDEX]["search"]["documents"]
    block = rerank_block(StudyIndex.of(study).searches["whitened"].dim)
    assert decoded and max(decoded) <= max(shard, block) < documents, (max(decoded), shard, block)


def test_growing_a_study_recomputes_only_new_shards(staged, tmp_path):
    study, _ = staged
    root = tmp_path / "grown"
    shutil.copytree(study.root, root)
    kept = layout.shard_file(1, "whitened")
    before = (root / kept).stat().st_mtime_ns
    grown = build_demo(root, seed=3, recipe=_staged_recipe(), progress=False, extra_documents=EXTRA + 1500)
    manifest = grown.verify(layout.READER_STAGES)
    assert (root / kept).stat().st_mtime_ns == before  # untouched: its texts did not change
    assert manifest["stages"][Stage.PROJECTION]["vectors"]["documents"] == study.manifest()["stages"][
        Stage.PROJECTION]["vectors"]["documents"] + 1500
    shrunk = build_demo(root, seed=3, recipe=_staged_recipe(), progress=False, extra_documents=0)
    manifest = shrunk.verify(layout.READER_STAGES)  # no stale shard left in the manifest
    assert manifest["stages"][Stage.INDEX]["search"]["kind"] == "ivf"
    assert not any(f.startswith(layout.shard(5)) for f in manifest["files"])


@pytest.mark.parametrize("method,exhaustive", [("multi-stage", False), ("multi-stage", True), ("single-stage", False)])
def test_batched_prompts_trace_as_one_by_one(staged, method, exhaustive):
    """Several prompts share one query pass (indexed: also one index search and one re-scoring pass;
    exhaustive or not indexed: every document scored per prompt): the same results as one by one."""
    from explorer.tracer import Tracer

    study, _ = staged
    tracer = Tracer.open(study.root, device="cpu")
    requests = [("Where was Alen Ashford born?", "Alen Ashford was born in Brismoor."),
                ("Who founded Westmere Bank?", "Westmere Bank was founded by Peron Wexford."),
                ("What is a good name for a boat?", "Heron.")]
    together = tracer.trace_many(requests, method=method, top_k=5, heatmaps=False, exhaustive=exhaustive)
    for (instruction, answer), trace in zip(requests, together):
        alone = tracer.trace(instruction, answer, method=method, top_k=5, heatmaps=False, exhaustive=exhaustive)
        assert [h.doc_id for h in trace.proponents] == [h.doc_id for h in alone.proponents]
        assert [h.doc_id for h in trace.opponents] == [h.doc_id for h in alone.opponents]
        assert np.allclose([h.score for h in trace.proponents], [h.score for h in alone.proponents], rtol=1e-4)
        assert trace.timings.generate is None and trace.timings.total > 0
        shared = method == "multi-stage" and not exhaustive
        assert ("shared by 3 prompts" in trace.settings.retrieval) == shared
        assert (trace.settings.retrieval == "exact, all documents") == (not shared)


def test_the_study_page_says_when_a_code_scan_serves_the_default_ranking(staged):
    from explorer.overview import summarize

    study, _ = staged
    summary = summarize(open_study(study.root))
    assert "code scan" not in summary.search_text()  # this corpus's lists are visited whole
    search = copy.deepcopy(summary.search)
    search["whitened"]["nprobe"] = 4
    text = replace(summary, search=search).search_text()
    assert "4 of them visited per sign" in text
    assert "the default ranking (gradient) comes from a code scan of every document instead (320 bytes each)" in text
    assert "128 coordinates in a basis fit on" in text and "512 coordinates of a count sketch" in text

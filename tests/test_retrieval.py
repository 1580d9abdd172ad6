"""Projection, index retrieval and the non-gradient baselines, against explicit computations.

Run with ``pytest -s`` to see the recall figures.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine import (
    BM25,
    KroneckerProjector,
    LanguageModelingTask,
    ScoreArguments,
    bm25_tokenize,
    find_tracked_layers,
    flatten,
    gradient_sq_norms,
    precondition,
    project_documents,
    representation_similarity,
    rescore,
    score_documents,
    sequence_gradients,
    stack_gradients,
)
from engine.search import scan

from conftest import lm_batch

TASK = LanguageModelingTask()
N_DOCS, DOC_BATCH, K = 200, 20, 10


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def layers(pt_model):
    return find_tracked_layers(pt_model)


@pytest.fixture(scope="module")
def corpus():
    """200 random ragged documents, kept as one padded batch so any subset can be re-batched."""
    return lm_batch(N_DOCS, 12, seed=100)


def batches_for(corpus, ids, size=DOC_BATCH):
    ids = torch.as_tensor(list(ids), dtype=torch.long)
    return [{k: v[ids[i:i + size]] for k, v in corpus.items()} for i in range(0, len(ids), size)]


@pytest.fixture(scope="module")
def doc_batches(corpus):
    return batches_for(corpus, range(N_DOCS))


@pytest.fixture(scope="module")
def queries(ft_model):
    """Eight prompt-answer queries, gradient-dot: u = grad L_q at the fine-tuned weights."""
    batch = lm_batch(8, 10, seed=7, ragged=False, prompt=5)
    grads = sequence_gradients(ft_model, TASK, batch, find_tracked_layers(ft_model))
    return precondition(grads, ScoreArguments(method="gradient-dot"))


@pytest.fixture(scope="module")
def exact_scores(pt_model, layers, doc_batches, queries):
    return score_documents(pt_model, TASK, doc_batches, layers, queries, progress=False).numpy()


def _pairs(shapes, seed, correlated=0.5):
    """Random U, G per layer (one row each); U partly aligned with G so <U, G> is far from 0."""
    g = torch.Generator().manual_seed(seed)
    docs = {n: torch.randn((1,) + s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    us = {n: correlated * d + torch.randn(d.shape, generator=g, dtype=torch.float64)
          for n, d in docs.items()}
    return us, docs


def _exact_inner(us, docs):
    return float(sum((us[n] * docs[n]).sum() for n in us))


def _recall(found: np.ndarray, exact_top: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / exact_top.shape[1] for f, e in zip(found, exact_top)]))


# --------------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------------

def test_projection_preserves_inner_products_in_expectation():
    shapes = {"a": (12, 7), "b": (5, 9)}
    us, docs = _pairs(shapes, seed=0)
    exact = _exact_inner(us, docs)
    estimates = []
    for seed in range(3000):
        proj = KroneckerProjector(shapes, dim_per_layer=6, seed=seed)
        estimates.append(float(proj.project_gradients(us) @ proj.project_gradients(docs).T))
    estimates = np.array(estimates)
    sem = estimates.std() / math.sqrt(len(estimates))
    assert proj.layers[0].k == (3, 2) and proj.dim == 12  # really compressed: 84 + 45 -> 12
    assert sem < 0.1 * abs(exact)  # the check below has teeth
    assert abs(estimates.mean() - exact) < 4 * sem, (estimates.mean(), exact, sem)


def test_projection_approaches_exact_with_k_and_is_exact_at_full_size():
    shapes = {"w": (64, 48)}
    us, docs = _pairs(shapes, seed=1, correlated=1.0)
    exact = _exact_inner(us, docs)
    errors = {}
    for k in (2, 8, 32, 46):
        rel = []
        for seed in range(40):
            proj = KroneckerProjector(shapes, seed=seed, dims={"w": (k, k)})
            est = float(proj.project_gradients(us) @ proj.project_gradients(docs).T)
            rel.append(abs(est - exact) / abs(exact))
        errors[k] = float(np.mean(rel))
    print("mean relative error by k_out = k_in:", errors)
    assert errors[2] > errors[8] > errors[32] > errors[46]
    assert errors[46] < 0.1
    full = KroneckerProjector(shapes, dim_per_layer=64 * 48)
    assert full.layers[0].k == (64, 48) and full.matrices["w"] == (None, None)  # identity
    est = float(full.project_gradients(us) @ full.project_gradients(docs).T)
    assert est == pytest.approx(exact, rel=1e-12)


def test_factor_dims_follow_the_target_and_layout_is_row_major():
    proj = KroneckerProjector({"a": (24, 9), "b": (8, 17)}, dim_per_layer=100)
    assert [layer.k for layer in proj.layers] == [(11, 9), (8, 12)] and proj.dim == 99 + 96
    # vector = [vec(P_S^T G P_A) of a, row-major | same of b]
    g = {n: torch.randn((3,) + s, dtype=torch.float64) for n, s in (("a", (24, 9)), ("b", (8, 17)))}
    v = proj.project_gradients(g)
    p_s, p_a = proj.matrices["b"]
    assert p_a is not None and p_s is None  # b's out side is kept whole (k_out = out = 8)
    torch.testing.assert_close(v[:, 99:].reshape(3, 8, 12), g["b"] @ p_a.double())
    with pytest.raises(ValueError, match="exactly one"):
        KroneckerProjector.for_layers([], 4, total_dim=8)


def test_project_documents_equals_projected_sequence_gradients(pt_model, layers, doc_batches):
    proj = KroneckerProjector.for_layers(layers, 16, seed=3)
    batches = doc_batches[:3]
    docs = project_documents(pt_model, TASK, batches, layers, proj, norms=True, dtype=np.float64,
                             progress=False)
    grads = stack_gradients(pt_model, TASK, batches, layers)
    expected = proj.project_gradients(grads).numpy()
    assert docs.vectors.shape == (60, proj.dim) == expected.shape
    np.testing.assert_allclose(docs.vectors, expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(docs.sq_norms, flatten(grads).square().sum(1).numpy(), rtol=1e-10)
    f32 = project_documents(pt_model, TASK, batches, layers, proj, progress=False)
    assert f32.vectors.dtype == np.float32 and f32.sq_norms is None
    np.testing.assert_allclose(docs.normalized(), expected / np.sqrt(docs.sq_norms)[:, None], rtol=1e-10)


@pytest.mark.parametrize("tokens", [2, 40])  # T*(out+in) below / above out*in: both norm formulas
def test_gradient_sq_norms_exact_both_ways(tokens):
    g = torch.Generator().manual_seed(tokens)
    acts = {"x": torch.randn(3, tokens, 9, generator=g, dtype=torch.float64)}
    grads = {"x": torch.randn(3, tokens, 24, generator=g, dtype=torch.float64)}
    G = torch.einsum("bto,bti->boi", grads["x"], acts["x"])
    torch.testing.assert_close(gradient_sq_norms(acts, grads), G.square().sum((1, 2)))


def test_projector_round_trip_and_checksum(tmp_path, layers, queries):
    proj = KroneckerProjector.for_layers(layers, 16, seed=5)
    for include in (False, True):
        path = tmp_path / f"p{include}.safetensors"
        proj.save(path, include_matrices=include, metadata={"model": "tiny"})
        back = KroneckerProjector.load(path)
        assert back.checksum() == proj.checksum() and back.layout() == proj.layout()
        assert KroneckerProjector.read_metadata(path) == {"model": "tiny"}
        torch.testing.assert_close(back.project_gradients(queries.vectors),
                                   proj.project_gradients(queries.vectors), rtol=0, atol=0)
    # a file whose recorded matrices are not what the seed regenerates is refused
    name = proj.layer_names[0]
    p_s, p_a = proj.matrices[name]
    proj.matrices[name] = (p_s * 2, p_a)
    proj.save(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="checksum"):
        KroneckerProjector.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="do not match"):
        proj.check_compatible(layers[1:])


# --------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------

def _index(pt_model, layers, doc_batches, dim_per_layer, seed=0):
    """The projector and the documents' projected rows (what a flat study index scans)."""
    proj = KroneckerProjector.for_layers(layers, dim_per_layer, seed=seed)
    docs = project_documents(pt_model, TASK, doc_batches, layers, proj, progress=False)
    return proj, np.asarray(docs.vectors, np.float32)


def retrieve(query_vectors, rows: np.ndarray, k: int):
    """Top-k of both signs over the projected rows, as the study's flat index serves them."""
    return scan([(0, rows)], query_vectors, k)


def test_recall_against_exact_scores(pt_model, layers, doc_batches, queries, exact_scores):
    top = np.argsort(-exact_scores, 1)[:, :K]
    bottom = np.argsort(exact_scores, 1)[:, :K]
    full = sum(a * b for a, b in (layer.gradient_shape for layer in layers))
    table = {}
    for dim in (4, 16, 64, 144, full):
        pro, opp = [], []
        for seed in range(3):
            proj, index = _index(pt_model, layers, doc_batches, dim, seed)
            found = retrieve(proj.project_gradients(queries.vectors), index, K)
            pro.append(_recall(found.proponent_ids, top))
            opp.append(_recall(found.opponent_ids, bottom))
        table[proj.dim] = (np.mean(pro), np.mean(opp))
    print(f"\nrecall@{K} vs projected dimension D (full gradient = {full}), mean of 3 seeds")
    for d, (p, o) in table.items():
        print(f"  D={d:5d}  proponents {p:.3f}  opponents {o:.3f}")
    assert table[512][0] >= 0.8 and table[512][1] >= 0.8
    assert table[4 * 8][0] < 0.9  # a small D really is approximate: the test can tell
    # identity-sized projection: exactly the exact top-k / bottom-k, and exact scores
    assert table[full] == (1.0, 1.0)
    proj, index = _index(pt_model, layers, doc_batches, full)
    found = retrieve(proj.project_gradients(queries.vectors), index, K)
    rows = np.arange(len(top))[:, None]
    np.testing.assert_array_equal(found.proponent_ids, top)
    np.testing.assert_array_equal(found.opponent_ids, bottom)
    np.testing.assert_allclose(found.proponent_projected, exact_scores[rows, top], rtol=1e-4)
    np.testing.assert_allclose(found.opponent_projected, exact_scores[rows, bottom], rtol=1e-4)
    assert (found.opponent_projected < 0).all() and found.proponent_exact is None


def test_opponents_are_the_most_negative_projected_scores(pt_model, layers, doc_batches, queries):
    proj, rows = _index(pt_model, layers, doc_batches, 16)
    q = np.asarray(proj.project_gradients(queries.vectors))
    found = retrieve(q, rows, K)
    projected = q @ rows.T
    np.testing.assert_array_equal(found.opponent_ids, np.argsort(projected, 1, kind="stable")[:, :K])
    np.testing.assert_allclose(found.opponent_projected, np.sort(projected, 1)[:, :K], rtol=1e-5)
    np.testing.assert_array_equal(found.proponent_ids, np.argsort(-projected, 1, kind="stable")[:, :K])
    assert (np.diff(found.proponent_projected, axis=1) <= 0).all()
    assert (np.diff(found.opponent_projected, axis=1) >= 0).all()


def test_rescore_gives_exact_scores_marked_as_such(pt_model, layers, corpus, doc_batches, queries,
                                                  exact_scores):
    proj, index = _index(pt_model, layers, doc_batches, 16)
    found = retrieve(proj.project_gradients(queries.vectors), index, K)
    asked = []

    def builder(ids):
        asked.append(list(ids))
        return batches_for(corpus, ids, size=7)

    done = rescore(found, pt_model, TASK, layers, queries, builder)
    assert len(asked) == 1 and asked[0] == sorted(set(asked[0]))  # each candidate scored once
    rows = np.arange(len(exact_scores))[:, None]
    np.testing.assert_allclose(done.proponent_exact, exact_scores[rows, done.proponent_ids], rtol=1e-10)
    np.testing.assert_allclose(done.opponent_exact, exact_scores[rows, done.opponent_ids], rtol=1e-10)
    assert (np.diff(done.proponent_exact, axis=1) <= 0).all()
    assert (np.diff(done.opponent_exact, axis=1) >= 0).all()
    # the same candidates per row, projected scores still aligned with their ids
    for i in range(len(rows)):
        assert set(done.proponent_ids[i]) == set(found.proponent_ids[i])
        before = dict(zip(found.proponent_ids[i], found.proponent_projected[i]))
        assert [before[d] for d in done.proponent_ids[i]] == list(done.proponent_projected[i])
    assert done.is_rescored and not found.is_rescored
    # over-fetch: 60 projected candidates, rescored, then the best 10 equal the exact top-10
    wide = rescore(retrieve(proj.project_gradients(queries.vectors), index, 60), pt_model, TASK,
                   layers, queries, lambda ids: batches_for(corpus, ids)).head(K)
    assert wide.proponent_ids.shape == (len(rows), K) and wide.opponent_exact.shape == (len(rows), K)
    np.testing.assert_array_equal(wide.proponent_ids, np.argsort(-exact_scores, 1)[:, :K])
    np.testing.assert_array_equal(wide.opponent_ids, np.argsort(exact_scores, 1)[:, :K])


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------

def test_bm25_matches_hand_computation():
    corpus = ["The cat sat.", "the dog", "Cat, cat and bird"]
    bm25 = BM25(corpus)
    assert bm25_tokenize("Cat, cat and bird") == ["cat", "cat", "and", "bird"]
    # N = 3, df(cat) = 2: idf = ln(1 + 1.5 / 2.5) = ln 1.6; |D| = 3, 2, 4, avgdl = 3
    idf = math.log(1.6)
    norm = [1.5 * (0.25 + 0.75 * n / 3) for n in (3, 2, 4)]
    expected = [idf * 1 * 2.5 / (1 + norm[0]), 0.0, idf * 2 * 2.5 / (2 + norm[2])]
    scores = bm25.score(["cat"])
    np.testing.assert_allclose(scores[0], expected, rtol=1e-12)
    assert scores[0, 2] == pytest.approx(0.6065, abs=1e-4)  # worked by hand: 0.4700 * 5 / 3.875
    # a repeated query term counts once; unknown terms add nothing
    np.testing.assert_allclose(bm25.score(["cat cat zebra"]), scores, rtol=1e-12)
    # two terms add up: "dog" appears once, idf = ln(1 + 2.5 / 1.5)
    dog = math.log(1 + 2.5 / 1.5) * 2.5 / (1 + norm[1])
    np.testing.assert_allclose(bm25.score(["cat dog"])[0], [expected[0], dog, expected[2]], rtol=1e-12)


def test_bm25_ranks_the_document_with_the_query_words_first():
    docs = [f"document {i} about topic {i % 7} and filler words" for i in range(50)]
    docs[31] = "Ada Lovelace was born in London and wrote the first program"
    bm25 = BM25(docs)
    scores = bm25.score_prompt_answer(["Where was Ada Lovelace born?"], ["She was born in London."])
    assert scores.shape == (1, 50) and int(np.argmax(scores[0])) == 31
    assert scores[0, 31] > 2 * np.sort(scores[0])[-2]


@pytest.mark.parametrize("tokens", ["all", "answer"])
def test_representation_similarity_equals_hand_computation(ft_model, tokens):
    query = lm_batch(3, 10, seed=11, prompt=4)
    docs = [lm_batch(4, 9, seed=12), lm_batch(5, 7, seed=13)]
    got = representation_similarity(ft_model, query, docs, query_tokens=tokens, progress=False)

    def pooled(batch, keep):
        with torch.no_grad():
            hidden = ft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              output_hidden_states=True).hidden_states[-1]
        return [hidden[i][keep[i]].mean(0) for i in range(len(hidden))]

    q_keep = (query["labels"] != -100) if tokens == "answer" else query["attention_mask"].bool()
    q = pooled(query, q_keep)
    d = [v for b in docs for v in pooled(b, b["attention_mask"].bool())]
    expected = np.array([[float(a @ b / (a.norm() * b.norm())) for b in d] for a in q])
    assert got.shape == (3, 9)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    if tokens == "answer":  # pooling only answer tokens really differs from pooling all
        other = representation_similarity(ft_model, query, docs, query_tokens="all", progress=False)
        assert not np.allclose(got, other)


def test_document_vectors_are_stored_in_16_bits_and_read_back_through_memory_maps(tmp_path):
    from engine.storage import decode_vectors, encode_vectors
    from engine.study import Study
    from engine.study.vectors import DocumentVectors, shard_done, write_shard

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 12)).astype(np.float32)
    torch_bf16 = torch.from_numpy(x).bfloat16().float().numpy()
    assert np.array_equal(decode_vectors(encode_vectors(x, "bfloat16"), "bfloat16"), torch_bf16)
    for dtype, bits in (("float16", 11), ("bfloat16", 8)):
        back = decode_vectors(encode_vectors(x, dtype), dtype)
        assert np.abs(back - x).max() <= 2.0 ** -bits * np.abs(x).max()
    tiny = x * 1e-9  # raw gradients can be this small: float16 flushes them, bfloat16 keeps them
    assert not decode_vectors(encode_vectors(tiny, "float16"), "float16").any()
    assert np.allclose(decode_vectors(encode_vectors(tiny, "bfloat16"), "bfloat16"), tiny, rtol=2 ** -8)

    study = Study(tmp_path)
    sq = (x.astype(np.float64) ** 2).sum(1) * 1e-18  # raw vectors of that tiny scale
    for s in range(2):
        assert not shard_done(study, s)
        write_shard(study, s, tiny[s * 20:(s + 1) * 20], x[s * 20:(s + 1) * 20], sq[s * 20:(s + 1) * 20], "float16")
        assert shard_done(study, s)
    vectors = DocumentVectors(study, shards=2, dtype="float16")
    raw = np.concatenate(list(vectors.chunks("raw")))  # stored divided by the exact norms: no underflow
    np.testing.assert_allclose(raw, tiny, rtol=2 ** -10, atol=2 ** -10 * np.abs(tiny).max())
    unit = np.concatenate(list(vectors.chunks("projected")))
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-3)
    np.testing.assert_allclose(vectors.sq_norms(), sq, rtol=0)
    assert vectors.dim("whitened") == 12


@pytest.mark.parametrize("dtype, width, levels, block, stored_bytes", [
    ("int8", 2500, 127, 2500, 2504), ("int4", 2500, 7, 1024, 1250 + 3 * 4), ("int4", 12, 7, 12, 6 + 4)])
def test_quantised_document_vectors_keep_their_scales_in_the_row(tmp_path, dtype, width, levels, block, stored_bytes):
    """int8 rows: codes times one float32 scale per row (max |x| / 127); int4: two codes a byte, one
    scale per 1,024 numbers (max |x| / 7). The scales end the row, so a gathered row decodes alone;
    error at most half a step of its own block, at any scale; zero rows stay zero."""
    from engine.storage import decode_vectors, encode_vectors, vector_bytes
    from engine.study import Study
    from engine.study.vectors import DocumentVectors, write_shard

    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, width)).astype(np.float32) * np.geomspace(1e-12, 1e6, 40, dtype=np.float32)[:, None]
    x[7] = 0.0
    stored = encode_vectors(x, dtype)
    assert stored.dtype == np.uint8 and stored.shape == (40, vector_bytes(width, dtype)) == (40, stored_bytes)
    back = decode_vectors(stored, dtype)
    blocks = -(-width // block)
    padded = np.zeros((40, blocks * block), np.float32)
    padded[:, :width] = np.abs(x)
    step = np.repeat(padded.reshape(40, blocks, block).max(2) / levels, block, axis=1)[:, :width]
    assert (np.abs(back - x) <= step / 2 * (1 + 1e-5)).all() and not back[7].any()
    assert np.abs(back - x).max() > 0  # it is quantised
    study = Study(tmp_path)
    sq = (x.astype(np.float64) ** 2).sum(1)
    for s in range(2):
        write_shard(study, s, x[s * 20:(s + 1) * 20], x[s * 20:(s + 1) * 20], sq[s * 20:(s + 1) * 20], dtype)
    vectors = DocumentVectors(study, shards=2, dtype=dtype, documents=40, shard_size=20)
    assert vectors.dim("whitened") == width
    every = np.concatenate(list(vectors.chunks("whitened")))
    np.testing.assert_array_equal(every, back)
    ids = np.array([0, 3, 4, 19, 20, 33, 39])
    np.testing.assert_array_equal(vectors.gather("whitened", ids), back[ids])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gathered_rows_equal_the_scanned_rows_across_many_shards(tmp_path, dtype):
    """Random rows (a query's candidates) read from five shards at once, in runs that cross shard
    boundaries, decode to exactly the rows a scan decodes; no ids give no rows."""
    from engine.study import Study
    from engine.study.vectors import DocumentVectors, write_shard

    x = np.random.default_rng(2).standard_normal((40, 24)).astype(np.float32)
    study = Study(tmp_path)
    sq = (x.astype(np.float64) ** 2).sum(1)
    for s in range(5):
        rows = slice(s * 8, (s + 1) * 8)
        write_shard(study, s, x[rows], x[rows], sq[rows], dtype)
    vectors = DocumentVectors(study, shards=5, dtype=dtype, documents=40, shard_size=8)
    every = np.concatenate(list(vectors.chunks("whitened")))
    np.testing.assert_allclose(every, x, rtol=2 ** -7)
    ids = np.array([0, 1, 2, 7, 8, 9, 15, 16, 23, 24, 25, 31, 32, 39])
    np.testing.assert_array_equal(vectors.gather("whitened", ids), every[ids])
    assert vectors.gather("whitened", np.array([], np.int64)).shape == (0, 24)

"""torchrun with 2 CPU processes (gloo) builds the tiny demo study exactly as 1 process does.

Both builds run as subprocesses with one thread per process, the way `msif build-demo --nproc`
runs them (float reductions depend on the thread count, not on the number of ranks).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine import Factors
from engine.study import Study, layout

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def builds(tiny_builds):
    return Study(tiny_builds(1)), Study(tiny_builds(2))


def test_two_processes_fit_the_factors_one_process_fits(builds):
    one, two = builds
    for factors in (layout.PT_FACTORS, layout.FT_FACTORS):
        a, b = Factors.load(one.path(factors)), Factors.load(two.path(factors))
        assert (a.num_sequences, a.num_tokens) == (b.num_sequences, b.num_tokens)
        assert a.arguments["accumulation"] == "float64" and list(a.layers) == list(b.layers)
        for name in a.layers:
            ours, theirs = a.layers[name].tensors(), b.layers[name].tensors()
            assert set(ours) == set(theirs)
            for key, value in ours.items():
                torch.testing.assert_close(theirs[key], value, rtol=1e-10, atol=0)


def test_two_processes_write_the_same_shards_and_study(builds):
    one, two = builds
    info = one.manifest()["stages"]["projection"]["vectors"]
    assert info == two.manifest()["stages"]["projection"]["vectors"]
    for s in range(info["shards"]):
        for kind in layout.SHARD_KINDS:
            path = layout.shard_file(s, kind)
            assert np.array_equal(np.load(one.path(path)), np.load(two.path(path))), path
    ours, theirs = one.manifest()["files"], two.manifest()["files"]
    assert set(ours) == set(theirs)  # rank 0 recorded every rank's files
    assert [f for f in ours if ours[f]["sha256"] != theirs[f]["sha256"]] == []


def test_two_process_study_answers_queries_as_the_one_process_study(builds):
    from explorer.tracer import Tracer

    one, two = (Tracer.open(study.root) for study in builds)
    questions = [json.loads(line)["prompt"]
                 for line in builds[0].path(layout.DEMO_PROMPTS).read_text().splitlines()][:5]
    facts = [json.loads(line) for line in builds[0].path(layout.FACTS).read_text().splitlines()]
    questions += [f["question"] for f in facts][: 5 - len(questions)]
    assert len(questions) == 5
    for question in questions:
        a, b = (t.trace(question, top_k=10, heatmaps=False) for t in (one, two))
        assert a.answer == b.answer
        assert [h.doc_id for h in a.proponents] == [h.doc_id for h in b.proponents]
        assert [h.doc_id for h in a.opponents] == [h.doc_id for h in b.opponents]
        np.testing.assert_allclose([h.score for h in b.proponents + b.opponents],
                                   [h.score for h in a.proponents + a.opponents], rtol=1e-8, atol=0)

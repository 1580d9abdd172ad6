"""A study is never silently wrong, never overwritten, never built by two processes at once."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from engine.study import Study, StudyError, layout, open_study
from engine.study import integrity as integrity_lib
from engine.study.lock import BuildLock
from precompute.cli import main as build

TINY = ["--tiny", "--quiet", "--seed", "3"]


@pytest.fixture
def study(tiny_study, tmp_path) -> Path:
    """A private copy of the shared tiny demo study."""
    copy = tmp_path / "study"
    shutil.copytree(tiny_study, copy)
    return copy


def _checksums(root: Path) -> dict[str, str]:
    return {rel: rec["sha256"] for rel, rec in Study(root).manifest()["files"].items()}


def _flip(path: Path, offset: int | None = None) -> None:
    """Change one byte in place: the file keeps its size."""
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _tensor_offset(path: Path, name: str) -> int:
    """Where a tensor's bytes start in a safetensors file (to hit the embedding, say)."""
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8:8 + length])
    return 8 + length + header[name]["data_offsets"][0] + 5


DAMAGE = {  # file -> (the stage that wrote it, where to flip a byte)
    "factors/pretrained/layer-0000.safetensors": ("factors-pretrained", None),
    "models/pretrained/model.safetensors": ("pretrain", "gpt_neox.embed_in.weight"),
    "tokenizer/tokenizer.json": ("tokenizer", None),
    "gradients/shards/shard-00000/whitened.npy": ("projection", None),
    "corpus/documents.parquet": ("corpus", None),
}


@pytest.mark.parametrize("rel", list(DAMAGE))
def test_a_flipped_byte_is_refused_and_the_build_repairs_that_stage_only(study, rel, monkeypatch):
    stage, tensor = DAMAGE[rel]
    before = _checksums(study)
    path = study / rel
    _flip(path, _tensor_offset(path, tensor) if tensor else None)
    with pytest.raises(StudyError) as err:
        open_study(study, device="cpu")
    message = str(err.value)
    assert rel in message and f"the {stage} stage" in message and "msif build-demo --out" in message

    rerun = []
    original = Study.record_stage
    monkeypatch.setattr(Study, "record_stage", lambda self, name, *a, **k: (rerun.append(name),
                                                                           original(self, name, *a, **k)))
    assert build(["build-demo", "--out", str(study), *TINY]) == 0
    assert rerun == [stage]
    assert _checksums(study) == before  # repaired byte for byte
    open_study(study, device="cpu")


def test_verification_is_cached_by_file_stamp(study, monkeypatch):
    hashed = []
    real = integrity_lib.sha256_file
    monkeypatch.setattr(integrity_lib, "sha256_file", lambda path, **k: (hashed.append(path), real(path, **k))[1])
    Study(study).verify()
    first = len(hashed)
    assert first == len(Study(study).manifest()["files"])  # a copied study: every file is hashed once
    hashed.clear()
    Study(study).verify()
    assert hashed == []  # unchanged: nothing is read again
    target = study / layout.DOCUMENTS.path
    target.write_bytes(target.read_bytes())  # rewritten, same bytes: new stamp, hashed again, still valid
    Study(study).verify()
    assert [Path(p).name for p in hashed] == ["documents.parquet"]


def test_a_damaged_cache_or_manifest_is_reported_not_a_traceback(study):
    (study / integrity_lib.CACHE).write_text("{not json")
    Study(study).verify()  # a damaged cache is only a cache: everything is hashed again
    manifest = study / layout.MANIFEST.path
    data = json.loads(manifest.read_text())
    del data["files"]
    manifest.write_text(json.dumps(data))
    with pytest.raises(StudyError, match="is damaged"):
        Study(study).verify()
    manifest.write_bytes(b"\xff\xfe garbage")
    with pytest.raises(StudyError, match="cannot be read"):
        Study(study).verify()


# -- no study is overwritten --------------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, bytes]:
    """Every byte of a study directory (the verification cache aside: it is only a cache)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != integrity_lib.CACHE}


@pytest.mark.parametrize("args, says", [
    (["--tiny", "--quiet", "--seed", "4"], "demo.seed is 3 there, 4 here"),
    (["--quiet", "--seed", "3"], "demo.recipe."),  # the full demo's recipe, not the tiny one
])
def test_building_another_demo_over_a_study_is_refused(study, args, says, capsys):
    before = _snapshot(study)
    assert build(["build-demo", "--out", str(study), *args]) == 2
    err = capsys.readouterr().err
    assert "holds another study" in err and says in err and "--force" in err and err.count("\n") == 1
    assert _snapshot(study) == before


def test_precompute_into_a_demo_study_or_a_directory_of_other_files_is_refused(study, tmp_path, capsys):
    config = tmp_path / "study.toml"
    config.write_text((Path(__file__).parents[1] / "assets/configs/pythia-70m-deduped-dolly.toml").read_text())
    before = _snapshot(study)
    assert build(["precompute", "--config", str(config), "--out", str(study)]) == 2
    assert "holds another study" in capsys.readouterr().err
    assert _snapshot(study) == before
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    assert build(["build-demo", "--out", str(home), *TINY]) == 2
    assert "is not empty and holds no study (thesis.tex)" in capsys.readouterr().err
    assert sorted(p.name for p in home.iterdir()) == ["thesis.tex"]


def test_app_never_rebuilds_an_existing_study(study, tmp_path, monkeypatch):
    """`msif app` on the default path, holding a finished demo of another seed: it is verified and
    served, not rebuilt; an unfinished one of another seed is refused by build-demo."""
    from explorer import cli

    demo = tmp_path / "work" / "studies" / "demo"
    demo.parent.mkdir(parents=True)
    shutil.move(study, demo)
    monkeypatch.chdir(tmp_path / "work")
    served, built = [], []
    monkeypatch.setattr("explorer.server.serve", lambda *a, **k: served.append(a) or 0)
    real_build = cli.build_studies
    monkeypatch.setattr(cli, "build_studies", lambda argv: built.append(argv) or real_build(argv))
    before = _snapshot(demo)
    assert cli.main(["app", "--no-browser"]) == 0
    assert served and not built and _snapshot(demo) == before

    data = json.loads((demo / "manifest.json").read_text())
    del data["stages"]["index"]  # unfinished
    (demo / "manifest.json").write_text(json.dumps(data))
    before = _snapshot(demo)
    assert cli.main(["app", "--no-browser"]) == 2
    assert built and _snapshot(demo) == before


# -- one build at a time ------------------------------------------------------------------------
def test_a_second_build_into_a_locked_study_is_refused(study, capsys):
    with BuildLock(study, ["msif", "build-demo", "--out", str(study)]):
        assert build(["build-demo", "--out", str(study), *TINY]) == 2
    err = capsys.readouterr().err
    assert "another build is writing" in err and f"pid {os.getpid()}" in err
    assert not (study / "build.lock").exists()  # released


def test_a_stale_lock_from_a_killed_build_is_taken_over(study, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (study / "build.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename,
                                                  "command": ["msif", "build-demo"], "since": "then"}))
    assert build(["build-demo", "--out", str(study), *TINY]) == 0
    assert f"took over the build lock of pid {dead.pid}" in capsys.readouterr().err
    assert not (study / "build.lock").exists()


@pytest.mark.slow
def test_two_concurrent_builds_one_refused(tmp_path):
    out = tmp_path / "study"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-m", "precompute", "build-demo", "--out", str(out), "--tiny",
                              "--quiet", "--seed", str(seed)], stderr=subprocess.PIPE, text=True, env=env)
            for seed in (3, 5)]
    results = [(run.wait(), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2]
    refused = next(err for code, err in results if code == 2)
    assert "another build is writing" in refused or "holds another study" in refused
    Study(out).verify()


def test_study_files_follow_the_umask_and_private_studies_are_private(tiny_study, tmp_path):
    manifest = tiny_study / layout.MANIFEST.path
    assert manifest.stat().st_mode & 0o044 == 0o044  # group- and world-readable under umask 022
    assert (tiny_study / layout.WORLD_DIR.path).stat().st_mode & 0o055 == 0o055
    out = tmp_path / "private"
    code = subprocess.run([sys.executable, "-m", "precompute", "build-demo", "--out", str(out), *TINY,
                           "--private"], env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    assert code == 0
    modes = {p.stat().st_mode & 0o077 for p in out.rglob("*")}
    assert modes == {0}


# -- interrupted builds end where an uninterrupted one does -------------------------------------
def test_the_progress_setting_changes_no_stored_byte(tiny_study, tmp_path):
    out = tmp_path / "loud"
    assert build(["build-demo", "--out", str(out), "--tiny", "--seed", "3"]) == 0  # progress bars on
    assert _checksums(out) == _checksums(tiny_study)


def _recorded(out: Path) -> list[str]:
    try:
        return list(json.loads((out / layout.MANIFEST.path).read_text())["stages"])
    except (OSError, ValueError, KeyError):
        return []


def _killed_then_finished(out: Path, argv: list[str], kill_when: list[str],
                          command: str = "build-demo") -> list[str]:
    """Run a build and kill -9 it (its whole process group: torchrun and its workers too) as soon as
    each mark in turn is reached, resuming each time, then let it finish. A mark is a stage name
    (killed right after that stage is recorded, inside the next one) or ``file:PATH`` (killed when
    that study file appears, e.g. a shard). Returns the stages recorded when each kill struck."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "precompute", command, "--out", str(out), *argv]
    struck = []
    for mark in kill_when:
        run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
        reached = ((lambda mark=mark: (out / mark[5:]).exists()) if mark.startswith("file:")
                   else (lambda mark=mark: mark in _recorded(out)))
        deadline = time.monotonic() + 300
        while run.poll() is None and not reached() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        struck.append(",".join(_recorded(out)) or "-")
    assert subprocess.run(command, env=env, stdout=subprocess.DEVNULL).returncode == 0
    return struck


@pytest.mark.slow
def test_kill_minus_9_anywhere_in_build_demo_then_rerun_gives_the_same_bytes(tiny_builds, tmp_path):
    whole, killed = tiny_builds(1), tmp_path / "killed"  # the reference: the same threads (float sums depend on them)
    # after factors-finetuned the projection runs; the flat index after it takes milliseconds, so no mark there
    marks = ["world", "pretrain", "finetune", "corpus", "factors-pretrained", "factors-finetuned"]
    struck = _killed_then_finished(killed, TINY, marks)
    assert len(set(struck)) >= 5 and all("index" not in s for s in struck), struck  # struck mid-build, in turn
    assert _checksums(killed) == _checksums(whole)
    assert sorted(_snapshot(killed)) == sorted(_snapshot(whole))  # no stray file, no temporary left


@pytest.mark.slow
def test_kill_minus_9_in_the_haystack_projection_then_rerun_gives_the_same_bytes(tiny_study, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for out in (whole, killed):
        shutil.copytree(tiny_study, out)
    grow = [*TINY, "--extra-documents", "2000"]
    _killed_then_finished(whole, grow, [])
    # killed as shards 1 and 2 of the 3 appear: inside the projection, twice
    _killed_then_finished(killed, grow, [f"file:{layout.shard_file(1, 'sq_norms')}",
                                         f"file:{layout.shard_file(2, 'sq_norms')}"])
    assert _checksums(killed) == _checksums(whole)
    assert sorted(_snapshot(killed)) == sorted(_snapshot(whole))


def _precompute_config(tiny_study: Path, tmp_path: Path) -> Path:
    """A real-study config over the tiny demo's models and data, outside any study."""
    config = Study(tiny_study).manifest()["config"]
    inf = {k: config["influence"][k] for k in ("alpha", "max_length", "batch_size", "projection_dim", "candidates",
                                               "accumulation")}
    path = tmp_path / "study.toml"
    path.write_text("\n".join([
        f"template = {json.dumps(config['template'])}",
        "[models]", *(f'{k} = "{tiny_study / config["models"][k]}"' for k in ("base", "finetuned", "tokenizer")),
        'device = "cpu"', "[pretraining]", f'path = "{tiny_study / config["pretraining"]["path"]}"',
        'title_field = "title"', "[finetuning]", f'path = "{tiny_study / config["finetuning"]["path"]}"',
        "[influence]", *(f"{k} = {json.dumps(v)}" for k, v in inf.items()), ""]))
    return path


@pytest.mark.slow
def test_kill_minus_9_anywhere_in_precompute_then_rerun_gives_the_same_bytes(tiny_study, tmp_path):
    config = ["--config", str(_precompute_config(tiny_study, tmp_path)), "--quiet"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _killed_then_finished(whole, config, [], command="precompute")
    struck = _killed_then_finished(killed, config, ["corpus", "factors-pretrained", "factors-finetuned"],
                                   command="precompute")
    assert all("index" not in s for s in struck), struck
    assert _checksums(killed) == _checksums(whole)
    assert sorted(_snapshot(killed)) == sorted(_snapshot(whole))


@pytest.mark.slow
def test_kill_minus_9_in_a_distributed_build_then_rerun_gives_the_same_bytes(tiny_builds, tmp_path):
    argv = [*TINY, "--nproc", "2"]
    whole, killed = tiny_builds(2), tmp_path / "killed"
    struck = _killed_then_finished(killed, argv, ["pretrain", "factors-pretrained", "factors-finetuned"])
    assert all("index" not in s for s in struck), struck
    assert _checksums(killed) == _checksums(whole)
    assert sorted(_snapshot(killed)) == sorted(_snapshot(whole))


def _descendants_of_build(out: Path) -> list[str]:
    """Command lines of live processes building ``out`` (msif, python -m precompute, torchrun, workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.name.isdigit() and str(out).encode() in args and (entry / "stat").read_text().split()[2] != "Z":
            found.append(" ".join(a.decode(errors="replace") for a in args))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_minus_9_of_msif_alone_leaves_no_build_behind(tiny_builds, tmp_path, nproc):
    """kill -9 of the `msif build-demo` process only (not its group): its build child, torchrun and
    torchrun's workers end with it; the rerun resumes and gives the bytes of an uninterrupted build."""
    import signal
    import time

    argv = [*TINY, *(["--nproc", str(nproc)] if nproc > 1 else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, killed = tiny_builds(nproc), tmp_path / "killed"
    msif = [sys.executable, "-m", "explorer", "build-demo"]
    run = subprocess.Popen([*msif, "--out", str(killed), *argv], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while "pretrain" not in _recorded(killed) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(_descendants_of_build(killed)) >= (4 if nproc > 1 else 2)  # msif, build (, torchrun, workers)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 10  # the kernel signals at once; torchrun takes a moment to stop its workers
    while _descendants_of_build(killed) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _descendants_of_build(killed) == []
    assert "index" not in _recorded(killed)  # struck mid-build
    assert subprocess.run([*msif, "--out", str(killed), *argv], env=env, stdout=subprocess.DEVNULL).returncode == 0
    assert _checksums(killed) == _checksums(whole)
    assert sorted(_snapshot(killed)) == sorted(_snapshot(whole))

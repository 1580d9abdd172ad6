"""A study's root is one absolute path: how it is spelled (relative, absolute, through a symlink, from
another working directory) changes nothing that is recorded or verified."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine.console import with_option
from engine.study import Stage, Study, StudyConfig, StudyError, open_study
from engine.study.integrity import CACHE
from engine.study.lock import BuildLock, StudyLocked
from precompute.cli import main as build

TINY = ["--tiny", "--quiet", "--seed", "3"]
HEX = re.compile(r"[0-9a-f]{64}")


@contextmanager
def working_directory(path: Path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory where the tiny demo was built as README's `make demo` builds the demo: with a
    relative --out (studies/demo), from that directory."""
    work = tmp_path_factory.mktemp("work")
    with working_directory(work):
        assert build(["build-demo", "--out", "studies/demo", *TINY]) == 0
    return work


def _identity(root: Path) -> dict:
    return Study(root).manifest()["stages"][Stage.FACTORS_PRETRAINED]["config"]["identity"]


def test_a_relative_build_records_the_checksum_of_every_model_file(workdir):
    root = workdir / "studies" / "demo"
    identity = _identity(root)
    assert set(identity) == {"base", "finetuned", "tokenizer"}
    where = {"base": "models/pretrained", "finetuned": "models/finetuned", "tokenizer": "tokenizer"}
    for role, files in identity.items():
        assert files and all(HEX.fullmatch(str(d)) for d in files.values()), (role, files)
        for name, digest in files.items():  # the real bytes, not a checksum of nothing
            assert digest == hashlib.sha256((root / where[role] / name).read_bytes()).hexdigest()
    command = Study(root).manifest()["command"]
    assert command[command.index("--out") + 1] == str(root)  # the recorded command works from anywhere


def test_every_spelling_names_one_study_and_opens_it(workdir, tmp_path):
    real = (workdir / "studies" / "demo").resolve()
    (tmp_path / "link").symlink_to(real)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    spellings = [(workdir, "studies/demo"), (workdir, "./studies/../studies/demo/"), (elsewhere, str(real)),
                 (elsewhere, os.path.relpath(real, elsewhere)), (elsewhere, "../link"),
                 (elsewhere, str(tmp_path / "link"))]
    for cwd, spelling in spellings:
        with working_directory(cwd):
            assert Study(spelling).root == real
            opened = open_study(spelling, device="cpu")
            assert opened.root == real
    cache = json.loads((real / CACHE).read_text())["files"]
    assert not [k for k in cache if k.startswith("/")]  # every file of the study cached once, by its study path


@pytest.fixture
def copied(workdir, tmp_path) -> Path:
    """A private copy of the relatively built study (so that it can be damaged)."""
    copy = tmp_path / "copy"
    shutil.copytree(workdir / "studies" / "demo", copy, symlinks=True)
    return copy


def _pass_file_check(root: Path, rel: str) -> None:
    """Record a changed file's new checksum in the manifest, as if the study's own file check had
    missed it: what is left to refuse it is the models' identity."""
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"][rel]["sha256"] = hashlib.sha256((root / rel).read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_a_changed_model_file_is_refused_under_every_spelling(copied, tmp_path):
    weights = "models/pretrained/model.safetensors"
    data = bytearray((copied / weights).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copied / weights).write_bytes(bytes(data))
    _pass_file_check(copied, weights)
    (tmp_path / "link").symlink_to(copied)
    for cwd, spelling in [(tmp_path, "copy"), (tmp_path, "link"), (copied, "."), (Path("/"), str(copied))]:
        with working_directory(cwd), pytest.raises(StudyError, match="base model's file model.safetensors"):
            open_study(spelling, device="cpu")


def test_a_study_with_null_model_checksums_is_refused_then_repaired_by_its_build(copied, tmp_path):
    """What msif before this fix recorded for a relatively built study: null checksums, which turned
    the identity check off. Refused with the command that repairs it; that command reruns only the
    stages that depend on the models' identity, and their files come back byte for byte."""
    manifest = json.loads((copied / "manifest.json").read_text())
    for record in manifest["stages"].values():  # the factor stages and those that copy their settings
        if "identity" in record["config"]:
            identity = record["config"]["identity"]
            record["config"]["identity"] = {role: dict.fromkeys(files) for role, files in identity.items()}
    manifest["command"] = with_option(manifest["command"], "--out", "studies/demo")  # as recorded then
    (copied / "manifest.json").write_text(json.dumps(manifest))
    files = {rel: rec["sha256"] for rel, rec in manifest["files"].items()}
    with working_directory(tmp_path), pytest.raises(StudyError) as refused:
        open_study("copy", device="cpu")
    message = str(refused.value)
    assert "records no checksum of the base model's files" in message
    assert f"msif build-demo --out {copied} " in message  # aimed at the study where it is now
    with working_directory(tmp_path):
        assert build(["build-demo", "--out", "copy", *TINY]) == 0
    repaired = Study(copied).manifest()
    assert {rel: rec["sha256"] for rel, rec in repaired["files"].items()} == files
    reran = {s for s, r in repaired["stages"].items() if r["finished"] != manifest["stages"][s]["finished"]}
    assert reran == {Stage.FACTORS_PRETRAINED, Stage.FACTORS_FINETUNED, Stage.PROJECTION}
    assert all(HEX.fullmatch(d) for files in _identity(copied).values() for d in files.values())
    open_study(copied, device="cpu")


def test_messages_name_where_the_study_is_now(copied, tmp_path):
    moved = tmp_path / "moved"
    copied.rename(moved)
    (moved / "world" / "facts.jsonl").write_text("changed")
    with working_directory(tmp_path), pytest.raises(StudyError, match=f"msif build-demo --out {moved} "):
        Study("moved").verify()


def test_one_build_lock_whatever_the_spelling(copied, tmp_path):
    (tmp_path / "link").symlink_to(copied)
    with BuildLock(Study(copied).root), working_directory(tmp_path):
        with pytest.raises(StudyLocked, match="another build is writing"):
            BuildLock(Study("link").root).acquire()
        assert build(["build-demo", "--out", "link", *TINY]) == 2  # refused through the other name


def test_local_paths_in_a_config_are_recorded_absolute(tmp_path):
    """A config's relative model and data paths mean the directory it was used from; the study keeps
    them absolute so that it opens from anywhere. Hub ids stay as written."""
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "data.jsonl").write_text("{}\n")
    toml = tmp_path / "study.toml"
    toml.write_text('[models]\nbase = "models/base"\nfinetuned = "org/child-model"\n'
                    '[pretraining]\npath = "data.jsonl"\nmore = ["./data.jsonl"]\n'
                    '[finetuning]\npath = "databricks/databricks-dolly-15k"\n')
    with working_directory(tmp_path):
        config = StudyConfig.from_toml("study.toml")
    assert config.models.base == str(tmp_path / "models" / "base")
    assert config.models.finetuned == "org/child-model"
    assert config.pretraining.path == config.pretraining.more[0] == str(tmp_path / "data.jsonl")
    assert config.finetuning.path == "databricks/databricks-dolly-15k"

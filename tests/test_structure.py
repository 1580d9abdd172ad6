"""The shape of the product: a light `msif`, build commands run by precompute in a child process,
and one owner of the study format whose layout names every file a build writes."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.study import Stage, Study, StudyError, layout, open_study

HEAVY = ("torch", "transformers", "datasets", "faiss", "streamlit", "numpy", "precompute")


def _run_msif(*argv: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``msif ARGV`` in a fresh interpreter: its result and which heavy modules it imported."""
    code = ("import sys\nfrom explorer.cli import main\n"
            "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as stop:\n    code = stop.code\n"
            f"print('IMPORTED', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)\n"
            "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    line = next(x for x in done.stderr.splitlines() if x.startswith("IMPORTED"))
    return done, ast.literal_eval(line.removeprefix("IMPORTED "))


def test_msif_help_imports_no_heavy_library():
    done, imported = _run_msif("--help")
    assert done.returncode == 0 and imported == []
    for command in ("build-demo", "precompute", "app", "query"):
        assert command in done.stdout
    done, imported = _run_msif("query", "--help")
    assert done.returncode == 0 and imported == [] and "multi-stage" in done.stdout and "bm25" in done.stdout


def test_build_commands_run_in_precompute():
    done, imported = _run_msif("build-demo", "--help")
    assert done.returncode == 0 and "--tiny" in done.stdout and "--seed" in done.stdout
    assert "precompute" not in imported  # the child process imported it, not msif
    done, _ = _run_msif("precompute", "--out", "x")
    assert done.returncode == 2 and "--config" in done.stderr  # precompute's own argument error


@pytest.mark.slow
def test_msif_build_demo_resumes_a_finished_study(tiny_study):
    from explorer.cli import main

    before = Study(tiny_study).manifest()
    assert main(["build-demo", "--out", str(tiny_study), "--tiny", "--quiet", "--seed", "3"]) == 0
    after = Study(tiny_study).manifest()
    assert after["stages"] == before["stages"] and after["files"] == before["files"]


def test_layout_names_every_file_a_build_writes(tiny_study):
    manifest = Study(tiny_study).verify(layout.DEMO_STAGES + layout.PIPELINE_STAGES)
    stages = {a.path: a.stage for a in layout.LAYOUT}
    for written in manifest["files"]:
        owners = [p for p in stages if written == p or written.startswith(p + "/")]
        assert owners, f"{written} is not in engine.study.layout"
        owner = max(owners, key=len)  # the most specific entry
        recorded = [s for s, info in manifest["stages"].items() if written in info["files"]]
        assert recorded == [stages[owner]], (written, recorded)
    assert set(layout.READER_STAGES) <= set(vars(Stage).values())


def test_a_study_of_another_format_version_is_refused_with_a_rebuild_message(tmp_path):
    study = tmp_path / "old"
    study.mkdir()  # format 1: factors in one float64 file, vectors concatenated (before 2026-12-01)
    (study / layout.MANIFEST.path).write_text(json.dumps({"format": layout.FORMAT, "format_version": 1,
                                                          "stages": {}, "files": {}}))
    with pytest.raises(StudyError, match=r"format 1; this one reads 3\): rebuild the study .*msif build-demo"):
        open_study(study)


def test_shipped_config_and_the_demo_share_the_one_dolly_template(tiny_study):
    from engine.study import StudyConfig, dolly_template

    config = Path(__file__).resolve().parents[1] / "assets" / "configs" / "pythia-2.8b-dolly-v2-3b.toml"
    shipped = StudyConfig.from_toml(config)
    assert shipped.template == dolly_template() and shipped.context_template == dolly_template(context=True)
    demo = StudyConfig.from_dict(Study(tiny_study).manifest()["config"])
    assert demo.prompts.prompt("Say hi.") == shipped.prompts.prompt("Say hi.")
    assert demo.prompts.prompt(" Say hi. ", "Some text.").endswith("Say hi.\n\nInput:\nSome text.\n\n### Response:\n")


def test_a_stopped_msif_stops_its_child_processes(tmp_path):
    """run_child (msif's build commands, the torchrun launch): SIGTERM to the parent ends the child."""
    import os
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = subprocess.Popen([sys.executable, "-c", "import sys\nfrom engine.processes import run_child\n"
                               f"sys.exit(run_child([sys.executable, '-c', {child!r}]))"])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 130
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)

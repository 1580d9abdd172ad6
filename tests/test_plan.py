"""`msif plan`: shapes read from configs alone, memory per stage, verdicts and advice."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from engine.plan import GIB, Shape, plan_study, report
from engine.study import StudyConfig

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
PYTHIA = ROOT / "assets" / "models"
CONFIG = ROOT / "assets" / "configs" / "pythia-2.8b-dolly-v2-3b.toml"


def test_the_paper_models_shape_from_its_config_alone():
    shape = Shape.of(str(PYTHIA / "pythia-2.8b"))
    assert len(shape.layers) == 128 and shape.parameters == 2_775_208_960
    assert shape.gradient_numbers == 2_517_319_680  # 2.52B tracked parameters
    assert round(shape.eigenbasis_numbers / 1e9, 2) == 9.65  # Q_A and Q_S: 9.65B numbers


def test_plan_for_the_paper_study_on_one_h200_and_on_80_gb():
    config = StudyConfig.from_toml(CONFIG)
    plan = plan_study(config, model_config=str(PYTHIA / "pythia-2.8b"))
    stages = {s.name: s for s in plan.stages}
    fit = stages["factors-pretrained"]
    # eigenbases (36 GiB in float32) + Lambda sums (9.4 GiB) + weights (5.2 GiB in bf16) + one batch
    assert 55 * GIB < fit.device_bytes < 70 * GIB and plan.fits(fit)
    assert stages["factors-pretrained"].disk_bytes == pytest.approx((9.65e9 + 2.52e9) * 4, rel=0.01)
    # the config holds both factor sets in bfloat16 while serving: the explorer fits an 80 GB GPU
    small = plan_study(config, device="h100", gpus=8, model_config=str(PYTHIA / "pythia-2.8b"))
    assert "every stage fits" in report(small, config)
    # int4 whitened rows, 1,008 coordinates a layer: at most 64 KiB a document with its scales and norm
    assert "document vectors: 63.6 KiB each (129,024 whitened + 256 projected numbers in int4" in report(small, config)
    assert stages["projection"].disk_bytes <= plan.documents * 64 * 1024
    assert {s.name: s.device_bytes for s in small.stages} == {s.name: s.device_bytes for s in plan.stages}
    serve = {s.name: s for s in small.stages}["serve (explorer)"]
    assert serve.device_bytes <= 70 * GIB and serve.parts["both factor sets (bfloat16)"] == pytest.approx(
        2 * (9.65e9 + 2.52e9) * 2, rel=0.01)
    stored = replace(config, influence=replace(config.influence, factor_precision="float32"))
    full = plan_study(stored, device="h100", model_config=str(PYTHIA / "pythia-2.8b"))
    text = report(full, stored)
    assert {s.name: s for s in full.stages}["serve (explorer)"].device_bytes > 100 * GIB
    assert "serve (explorer)" in text and "DOES NOT FIT" in text and 'factor_precision = "bfloat16"' in text
    tiny_gpu = plan_study(config, device_memory=20 * GIB, model_config=str(PYTHIA / "pythia-2.8b"))
    assert "lower batch_size (now 2)" in report(tiny_gpu, config)


def test_msif_plan_runs_offline():
    done = subprocess.run([sys.executable, "-m", "explorer", "plan", "--config", str(CONFIG), "--model-config",
                           str(PYTHIA / "pythia-2.8b"), "--gpus", "8"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "8 x h200" in done.stdout and "factors-pretrained" in done.stdout and "every stage fits" in done.stdout


@pytest.mark.slow
def test_memory_plan_benchmark_matches_a_measured_run(tmp_path, capsys):
    bench = load_benchmark("memory_plan")
    assert bench.main(["--shapes", "pythia-14m", "--documents", "8", "--records", "4", "--max-length", "32",
                       "--threads", "1", "--keep", str(tmp_path)]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| pythia-14m")]
    ratios = {row[2].strip(): float(row[5]) for row in rows}
    assert set(ratios) >= {"factors-pretrained", "factors-finetuned", "projection"}
    assert all(0.7 < r < 1.4 for r in ratios.values()), ratios


@pytest.mark.slow
def test_gpu_check_smoke_runs_on_the_cpu(capsys):
    bench = load_benchmark("gpu_check")
    assert bench.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "(a) tiny demo" in out and "| factors-pretrained |" in out
    assert "| per query (3, typed answers; factors held in bfloat16) |" in out

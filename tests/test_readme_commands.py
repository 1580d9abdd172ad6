"""README's main command, exactly as written, the way a newcomer runs it: `make demo` from the
repository root, which builds the demo into the relative `studies/demo` when it is missing and serves
the app on it with no --study. In headless Chromium the prompt box appears, one pretraining-only
question is answered and traced with token heatmaps, and the page shows no error.

The demo is built once (about 18 minutes on the one thread of a test worker) and kept at
`studies/demo`, as `make demo` keeps it, so a later run (or `make demo` itself) reuses it. Needs
Debian's chromium and chromium-driver, like test_browser.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from engine.study import DEFAULT_STUDY, Stage, Study, layout
from explorer.server import wait_until_serving

from browser_harness import (
    FIRST_RESULT,
    HEATMAP_TOKEN,
    RANKED,
    chromium,
    free_port,
    page_errors,
    require_chromium,
    trace_in_browser,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUILD_SECONDS = 1500  # a first `make demo` builds the demo study before it serves

require_chromium()


def readme_commands() -> list[str]:
    """The commands of README's "Two commands" block."""
    block = re.search(r"## Two commands\s+```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no 'Two commands' block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


@contextlib.contextmanager
def make_demo(log: Path, port: int):
    """`make demo` (with README's PORT= variant, so that a busy 8501 is not taken) from the repository
    root, in its own process group; yields once the app answers, stops the whole group after."""
    with open(log, "w") as out:
        process = subprocess.Popen(["make", "demo", f"PORT={port}"], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if not wait_until_serving(f"http://localhost:{port}", process, BUILD_SECONDS):
            raise AssertionError(f"`make demo` served nothing (exit {process.poll()}):\n{log.read_text()[-3000:]}")
        yield f"http://localhost:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # msif stops its server on SIGTERM
        try:
            process.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def test_readme_names_the_commands_tested_here():
    assert readme_commands() == ["make demo", "make test"]


def test_make_demo_serves_a_page_that_answers_and_traces(tmp_path):
    from selenium.webdriver.common.by import By

    study = ROOT / DEFAULT_STUDY
    with make_demo(tmp_path / "make-demo.log", free_port()) as url, chromium() as browser:
        identity = Study(study).manifest()["stages"][Stage.FACTORS_PRETRAINED]["config"]["identity"]
        assert all(isinstance(d, str) for files in identity.values() for d in files.values()), identity
        question = json.loads(Study(study).path(layout.DEMO_PROMPTS).read_text().splitlines()[0])["prompt"]
        rows = json.loads(Study(study).path(layout.QA_REPORT).read_text())["pretrain_only"]["rows"]
        value = next(r["answer"] for r in rows if r["question"] == question)  # the fact, e.g. the town
        seconds = trace_in_browser(browser, url, question)  # waits for the prompt box first
        assert browser.find_elements(By.CSS_SELECTOR, HEATMAP_TOKEN), "no token heatmap"
        assert browser.find_elements(By.XPATH, FIRST_RESULT) and len(browser.find_elements(By.XPATH, RANKED)) >= 2
        answer = browser.find_elements(By.XPATH, "//*[normalize-space(.)='Answer']/following::div"
                                                 "[contains(@class, 'msif-heat')][1]")
        assert answer and value in answer[0].text, f"the model's answer should name {value!r}"
        assert page_errors(browser) == []
    print(f"\nmake demo: {question!r} traced in {seconds:.2f} s in Chromium")

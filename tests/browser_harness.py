"""Test support: drive the running app in headless Chromium (the browser test and the latency benchmark).

Uses the system's Chromium and chromedriver (Debian: ``apt install chromium chromium-driver``);
nothing is downloaded. Selenium is a test extra, imported only here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from explorer.server import wait_until_serving

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1800"]
HEATMAP_TOKEN = "span.msif-tok"
FIRST_RESULT = "//*[@data-testid='stMarkdownContainer'][starts-with(normalize-space(.), '#1 ·')]"
RANKED = "//*[@data-testid='stMarkdownContainer'][contains(., ' · doc ')]"  # one per ranked document
RUNNING = '[data-testid="stStatusWidget"]'  # Streamlit's "running" indicator
ERRORS = '[data-testid="stException"], [data-testid^="stAlertContentError"]'  # an error page, st.error


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) executables, or None when either is missing."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


def require_chromium() -> None:
    """At a browser test module's top: skip it without Chromium, unless MSIF_REQUIRE_BROWSER=1 (CI), where
    that is a failure."""
    import pytest

    if find_chromium() is None:
        if os.environ.get("MSIF_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required (apt install chromium chromium-driver)",
                        pytrace=False)
        pytest.skip("no chromium/chromedriver on PATH (apt install chromium chromium-driver)",
                    allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(study: str | Path, log: Path, port: int | None = None,
                timeout: float = 120.0) -> Iterator[str]:
    """``msif app --study STUDY`` in a subprocess; yields its URL once it answers health checks."""
    port = port or free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "explorer", "app", "--study", str(study),
                                    "--port", str(port), "--no-browser"], stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://localhost:{port}"
    try:
        if not wait_until_serving(url, process, timeout):
            if process.poll() is not None:
                raise RuntimeError(f"the app exited with {process.returncode}:\n{log.read_text()}")
            raise RuntimeError(f"the app did not start within {timeout:.0f} s")
        yield url
    finally:  # the CLI stops its server on SIGTERM; the group kill is a safety net
        process.terminate()
        try:
            process.wait(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def chromium() -> Iterator[webdriver.Chrome]:  # noqa: F821
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise RuntimeError("chromium and chromedriver are required: apt install chromium chromium-driver")
    with tempfile.TemporaryDirectory(prefix="msif-chromium-") as profile:
        options = Options()
        options.binary_location = found[0]
        for flag in FLAGS + [f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(found[1]), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def page_errors(driver) -> list[str]:
    """The text of every error the page shows: Streamlit's error page (an exception) or st.error."""
    from selenium.webdriver.common.by import By

    errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ERRORS)]
    body = driver.find_element(By.TAG_NAME, "body").text
    return errors + (["This app has encountered an error"] if "This app has encountered an error" in body else [])


def open_app(driver, url: str, timeout: float = 120.0):
    """Load the trace page and wait until its prompt box is usable; returns the box."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    return WebDriverWait(driver, timeout).until(
        EC.element_to_be_clickable((By.CSS_SELECTOR, 'textarea[aria-label="Prompt"]')))


# Clicks Trace and resolves, inside the page, once the heatmaps and the first ranked document are
# in the DOM and the run has ended. A MutationObserver instead of WebDriver polling: on a 2-core
# machine, polling steals CPU from the server being measured.
_CLICK_AND_WAIT = """
const [button, heatmap, firstResult, running, done] = arguments;
const ready = () => document.querySelector(heatmap) && !document.querySelector(running) &&
  document.evaluate(firstResult, document, null, XPathResult.FIRST_ORDERED_NODE_TYPE, null).singleNodeValue;
const started = performance.now();
const observer = new MutationObserver(() => {
  if (ready()) { observer.disconnect(); done((performance.now() - started) / 1000); }
});
observer.observe(document.body, {childList: true, subtree: true, attributes: true});
button.click();
"""


def trace_in_browser(driver, url: str, prompt: str, timeout: float = 120.0) -> float:
    """Type ``prompt``, click Trace, and wait for ranked documents with heatmaps and the end of
    the run. Returns seconds from the click to that point, timed by the page itself."""
    from selenium.webdriver.common.by import By

    box = open_app(driver, url, timeout)
    box.send_keys(prompt)
    button = driver.find_element(By.XPATH, "//button[normalize-space(.)='Trace']")
    driver.set_script_timeout(timeout)
    return float(driver.execute_async_script(_CLICK_AND_WAIT, button, HEATMAP_TOKEN, FIRST_RESULT, RUNNING))

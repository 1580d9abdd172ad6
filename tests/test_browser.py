"""A real browser: `msif app` serves the tiny demo study, headless Chromium types a prompt, clicks
Trace, waits for ranked documents and a token heatmap, and saves a screenshot.

Needs Debian's `chromium` and `chromium-driver` (CI installs them; nothing is downloaded). Without
them the test is skipped, unless MSIF_REQUIRE_BROWSER=1 (set by .ci/run), where it fails.
"""

from __future__ import annotations

import json
import os

import pytest

from engine.study import Study, layout

from browser_harness import FIRST_RESULT, HEATMAP_TOKEN, RANKED, chromium, find_chromium, running_app, trace_in_browser

pytestmark = pytest.mark.slow

if find_chromium() is None:
    if os.environ.get("MSIF_REQUIRE_BROWSER"):
        pytest.fail("chromium and chromedriver are required (apt install chromium chromium-driver)",
                    pytrace=False)
    pytest.skip("no chromium/chromedriver on PATH (apt install chromium chromium-driver)",
                allow_module_level=True)


def test_prompt_to_ranked_documents_and_heatmap(tiny_study, tmp_path):
    from selenium.webdriver.common.by import By

    question = json.loads(Study(tiny_study).path(layout.DEMO_PROMPTS).read_text().splitlines()[0])["prompt"]
    with running_app(tiny_study, tmp_path / "server.log") as url, chromium() as browser:
        seconds = trace_in_browser(browser, url, question)
        tokens = browser.find_elements(By.CSS_SELECTOR, HEATMAP_TOKEN)
        titles = [t.get_attribute("title") for t in tokens[:50]]
        assert tokens and all("influence" in t for t in titles)  # the value on hover
        assert any("rgba(" in (t.get_attribute("style") or "") for t in tokens)
        assert browser.find_elements(By.XPATH, FIRST_RESULT)
        ranked = browser.find_elements(By.XPATH, RANKED)
        assert len(ranked) >= 2
        answer = browser.find_elements(By.XPATH,
                                       "//h2[normalize-space(.)='Answer'] | //h3[normalize-space(.)='Answer']")
        assert answer, "the answer heading is missing"
        assert "prompt=" in browser.current_url and "method=multi-stage" in browser.current_url
        shot = tmp_path / "explorer.png"
        browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000
    print(f"\nbrowser: ranked documents and heatmaps {seconds:.2f} s after the click; "
          f"{len(ranked)} documents, {len(tokens)} token spans; screenshot {shot}")

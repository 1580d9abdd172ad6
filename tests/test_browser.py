"""A real browser: `msif app` serves the tiny demo study, headless Chromium types a prompt, clicks
Trace, waits for ranked documents and a token heatmap, and saves a screenshot.

Needs Debian's `chromium` and `chromium-driver` (CI installs them; nothing is downloaded). Without
them the test is skipped, unless MSIF_REQUIRE_BROWSER=1 (set by .ci/run), where it fails.
"""

from __future__ import annotations

import json

import pytest

from engine.study import Study, layout

from browser_harness import (
    FIRST_RESULT,
    HEATMAP_TOKEN,
    RANKED,
    chromium,
    require_chromium,
    running_app,
    trace_in_browser,
)

pytestmark = pytest.mark.slow

require_chromium()


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


HOSTILE = [  # (title, text): every kind of markup a corpus can carry; none may run or render
    ("<b onmouseover=\"window.__pwned='title'\">Bold title</b>",
     "<script>window.__pwned = 'script'</script> Garmoor is a town with a market."),
    ("Image", "<img src=x onerror=\"window.__pwned='img'\"> Perda Yarmere was born in Garmoor."),
    ("Links", "[click me](javascript:window.__pwned='md') and <a href=\"javascript:window.__pwned='a'\">here</a> "
              "Garmoor has a river."),
    ("Markdown", "**loud** _quiet_ ![picture](http://127.0.0.1:9/x.png) # heading\n---\n| a | b | Garmoor."),
]


@pytest.fixture
def hostile_study(tiny_study, tmp_path):
    """A study over the tiny demo's models whose corpus is mostly markup meant to run in a page."""
    from engine.study import StudyConfig
    from precompute.pipeline import run_pipeline

    world = [json.loads(line) for line in Study(tiny_study).path(layout.WORLD_DOCUMENTS).read_text().splitlines()]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"title": t, "text": x}) + "\n"
                            for t, x in HOSTILE + [(d["title"], d["text"]) for d in world[:8]]))
    config = Study(tiny_study).manifest()["config"]
    config["models"] = {**config["models"], **{k: str(tiny_study / config["models"][k])
                                               for k in ("base", "finetuned", "tokenizer")}}
    config["pretraining"] = {**config["pretraining"], "path": str(docs), "more": []}
    config["finetuning"]["path"] = str(tiny_study / config["finetuning"]["path"])
    config["influence"]["factor_documents"] = 0
    return run_pipeline(StudyConfig.from_dict(config), tmp_path / "hostile", progress=False).root


def test_markup_in_documents_and_prompts_renders_as_text(hostile_study, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    prompt = "<img src=x onerror=\"window.__pwned='prompt'\"> Where was Perda Yarmere born?"
    with running_app(hostile_study, tmp_path / "server.log") as url, chromium() as browser:
        trace_in_browser(browser, url, prompt)
        assert browser.execute_script("return window.__pwned") is None
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018 - reading it is the check
        injected = browser.execute_script(
            "return [...document.querySelectorAll('img[src=\"x\"], a[href^=\"javascript:\"], [onerror], "
            "[onmouseover], img[src^=\"http://127.0.0.1:9\"]')].map(e => e.outerHTML)")
        assert injected == []
        text = browser.find_element(By.TAG_NAME, "body").text
        assert "onerror" in text and ("<script>" in text or "javascript:" in text)  # shown, as text
        assert "Bold title" in text and "<b" in text


def _wait_for(browser, condition, timeout: float = 120.0):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    from browser_harness import RUNNING

    def done(driver):
        from selenium.webdriver.common.by import By

        return not driver.find_elements(By.CSS_SELECTOR, RUNNING) and condition(driver)

    return WebDriverWait(browser, timeout, poll_frequency=0.5,  # the page re-renders while we look
                         ignored_exceptions=(StaleElementReferenceException,)).until(done)


def _body(browser) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.TAG_NAME, "body").text


def _usable(browser, css: str):
    from selenium.webdriver.common.by import By

    found = browser.find_elements(By.CSS_SELECTOR, css)
    return found[0] if found and found[0].is_displayed() and found[0].is_enabled() else False


def test_contrastive_trace_and_answer_span(tiny_study, tmp_path):
    """Why this answer rather than that one; then the documents behind two of its tokens alone."""
    from selenium.webdriver.common.by import By

    from browser_harness import open_app, page_errors

    question = json.loads(Study(tiny_study).path(layout.DEMO_PROMPTS).read_text().splitlines()[0])["prompt"]
    with running_app(tiny_study, tmp_path / "server.log") as url, chromium() as browser:
        box = open_app(browser, url)
        box.send_keys(question)
        browser.find_element(By.XPATH, "//summary[contains(., 'Context, answer and contrast')]"
                             ).click()
        boxes = {a: _wait_for(browser, lambda d, a=a: _usable(d, f'textarea[aria-label^="{a}"]'))
                 for a in ("Answer to trace", "Rather than")}
        boxes["Answer to trace"].send_keys("In Ostgate.")
        boxes["Rather than"].send_keys("In Brightwater.")
        browser.find_element(By.XPATH, "//button[normalize-space(.)='Trace']").click()
        # Wait for the new trace's own words: between the click's run and its rerun, the URL is already
        # new while the page still shows the old results.
        _wait_for(browser, lambda d: "versus=" in d.current_url and d.find_elements(By.XPATH, FIRST_RESULT)
                  and "log p(answer) - log p(versus)" in _body(d))
        text = _body(browser)
        assert "rather than" in text and "In Brightwater." in text and "more likely than the other" in text
        assert "log p(answer) - log p(versus)" in text and not page_errors(browser)
        browser.save_screenshot(str(tmp_path / "contrast.png"))

        from selenium.webdriver.common.keys import Keys

        boxes["Rather than"].send_keys(Keys.CONTROL, "a")  # back to one answer: its tokens become buttons
        boxes["Rather than"].send_keys(Keys.DELETE)
        browser.find_element(By.XPATH, "//button[normalize-space(.)='Trace']").click()
        _wait_for(browser, lambda d: "versus=" not in d.current_url
                  and d.find_elements(By.CSS_SELECTOR, '[data-testid="stButtonGroup"] button'))
        tokens = browser.find_elements(By.CSS_SELECTOR, '[data-testid="stButtonGroup"] button')
        assert len(tokens) >= 3
        picked = '[data-testid="stButtonGroup"] button[aria-pressed="true"]'
        tokens[0].click()
        _wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, picked)) == 1
                  and d.find_element(By.XPATH, "//button[normalize-space(.)='Rank by the picked tokens']").is_enabled())
        browser.find_elements(By.CSS_SELECTOR, '[data-testid="stButtonGroup"] button')[2].click()
        _wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, picked)) == 2)
        browser.find_element(By.XPATH, "//button[normalize-space(.)='Rank by the picked tokens']").click()
        _wait_for(browser, lambda d: "span=0%3A3" in d.current_url and d.find_elements(By.XPATH, FIRST_RESULT)
                  and "log p(answer tokens 0:3)" in _body(d))
        text = _body(browser)
        assert "picked tokens" in text and "log p(answer tokens 0:3)" in text and not page_errors(browser)

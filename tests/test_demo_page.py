"""The demo page served at / by serve.py: in headless Chromium (Debian's, driven by playwright) against a real
server process, a person pastes a post, picks a task and sees labels, explanation and the screening notice, and
compares two models' answers side by side."""

import shutil

import pytest
from serving import Server, make_adapter

pytestmark = [pytest.mark.slow, pytest.mark.browser]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As the machine's notes advise: no sandbox (root), no GPU, no background traffic to the (closed) network.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def page_server(tmp_path_factory, cli_cache):
    adapter = make_adapter(cli_cache, tmp_path_factory.mktemp("adapter") / "adapter")
    second = make_adapter(cli_cache, tmp_path_factory.mktemp("adapter") / "second", seed=1)
    srv = Server(
        tmp_path_factory.mktemp("page"),
        cli_cache,
        adapter,
        "data.max_length=128",
        "serve.max_tokens=48",
        "generation.max_new_tokens=48",
        f"serve.adapters={{second:'{second}'}}",
    )
    yield srv
    srv.stop()


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_a_post_gets_labels_explanation_and_the_notice(page_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    requests = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_server.url + "/")
        assert "not a diagnosis" in page.inner_text("#notice")
        page.wait_for_function("document.querySelectorAll('#task option').length > 3")
        page.select_option("#task", "irf")
        assert page.is_visible("#aspect")  # an aspect task asks which aspect
        page.select_option("#task", "socialcd_3k")
        assert not page.is_visible("#aspect")
        page.fill("#post", "我考试没考好，我就是个废物，以后肯定没人要我。")
        page.click("#go")
        page.wait_for_selector("#result", state="visible", timeout=120_000)
        assert "research" in page.inner_text("#result-notice") and page.inner_text(".answer .explanation").strip()
        assert page.locator(".answer").count() == 1
        page.select_option("#compare", "second")  # the same post, two models side by side
        page.click("#go")
        page.wait_for_function("document.querySelectorAll('.answer').length === 2", timeout=120_000)
        assert [page.inner_text(f".answer:nth-child({i}) .model-name") for i in (1, 2)] == ["mentalglm", "second"]
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        page.fill("#post", "   ")
        page.click("#go")
        page.wait_for_function("document.getElementById('status').textContent.includes('empty')")
        browser.close()
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert all(u.startswith(page_server.url) for u in requests)  # no external assets

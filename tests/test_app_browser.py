"""End to end in a real browser: Playwright drives Debian's Chromium (headless) against app/run.py.

Uploads an image, types class names, runs each tab and checks what a person would see, and
saves a screenshot of each tab. Screenshots go to $CLIPTEACHER_SCREENSHOTS (the README's
pictures: CLIPTEACHER_BUNDLE=bundles/default CLIPTEACHER_SCREENSHOTS=docs/screenshots), else to a
temp folder. The app serves $CLIPTEACHER_BUNDLE when set, else a tiny random test bundle.

Needs `apt-get install chromium` and `pip install playwright` (no `playwright install`).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import ROOT, free_port, start_app, tiny_bundle

CHROMIUM = "/usr/bin/chromium"
EXAMPLES = ROOT / "clipteacher" / "app" / "examples"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]  # a synthetic camera
NAMES = "house, grass, tree, cow, sky"  # the app example: "house" is outside the default vocabulary

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    bundle = os.environ.get("CLIPTEACHER_BUNDLE") or tiny_bundle(tmp_path_factory.getbasetemp())
    port = free_port()
    log = tmp_path_factory.mktemp("browser") / "app.log"
    proc = start_app(Path(bundle), port, log)
    yield f"http://127.0.0.1:{port}/", log
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_context(viewport={"width": 1360, "height": 900}, permissions=["camera"]).new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server[0])
        page.get_by_role("tab", name="Segment").wait_for(timeout=30_000)
        page.errors = errors
        yield page
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("CLIPTEACHER_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def toast_text(page) -> str:
    toast = page.locator("[data-testid=toast-text]").last
    toast.wait_for(timeout=20_000)
    return toast.inner_text()


def close_toasts(page) -> None:
    for close in page.locator("[data-testid=toast-close]").all():
        close.click()


def test_segment_tab(page, shots):
    page.get_by_text("Examples (synthetic drawings)").wait_for(timeout=30_000)  # the example pictures are listed
    page.locator("text=sky, mountain, sea, boat").first.wait_for(timeout=30_000)
    page.locator("input[type=file]").first.set_input_files(str(EXAMPLES / "farm.jpg"))
    names = page.get_by_label("Class names (comma or newline separated)")
    names.fill("")
    run = page.get_by_role("button", name="Segment", exact=True)
    run.click()  # no class names: a clear message, not a stack trace
    assert "Type at least one class name" in toast_text(page)
    close_toasts(page)
    names.fill(NAMES)
    run.click()
    legend = page.locator("#legend .legend-entry")
    legend.first.wait_for(timeout=60_000)
    shown = {t.rsplit(" ", 1)[0] for t in legend.all_inner_texts()}  # "cow 12%"
    assert shown and shown <= set(NAMES.split(", "))
    overlay = page.locator("#overlay img")
    # sent inside the response: shown without fetching a file
    assert overlay.first.is_visible() and overlay.first.get_attribute("src").startswith("data:image/jpeg;base64,")
    page.get_by_text("image pass run").wait_for(timeout=10_000)
    page.locator("[aria-label='farm_mask.png']").wait_for(timeout=10_000)  # the download, named for the upload
    link = page.locator("[data-testid=download-link][href^='data:image/png;base64,']")
    assert link.count() >= 1 and link.first.get_attribute("download") == "farm_mask.png"
    assert page.get_by_text("Share of pixels").is_visible()
    page.wait_for_timeout(500)
    page.screenshot(path=str(shots / "segment.png"), full_page=True)


def test_attention_tab(page, shots):
    page.get_by_role("tab", name="GLM attention").click()
    page.get_by_role("button", name="Show attention").click()
    page.get_by_text("effective locations").wait_for(timeout=60_000)
    captions = page.locator(".caption-label")
    captions.first.wait_for(timeout=10_000)
    assert any(t.startswith("cow: max cos ") for t in captions.all_inner_texts())
    page.wait_for_timeout(500)
    page.screenshot(path=str(shots / "attention.png"), full_page=True)


def test_pseudo_labels_tab(page, shots, server):
    page.get_by_role("tab", name="Pseudo labels").click()
    page.locator("input[type=file]").nth(1).set_input_files(str(EXAMPLES / "farm_label.png"))
    page.wait_for_timeout(500)
    page.get_by_role("button", name="Make pseudo labels").click()
    page.get_by_text("teacher tokens").wait_for(timeout=60_000)
    captions = page.locator(".caption-label").all_inner_texts()
    assert any(t.startswith("k = 3") for t in captions) and any(t.startswith("fused:") for t in captions)
    assert page.get_by_text("restricted to the label").is_visible()
    page.wait_for_timeout(500)
    page.screenshot(path=str(shots / "pseudo_labels.png"), full_page=True)
    assert page.errors == []
    assert "Traceback" not in server[1].read_text()


def test_wrong_size_label_keeps_serving(page, tmp_path):
    from PIL import Image

    Image.new("L", (40, 30), 255).save(tmp_path / "small_label.png")
    page.locator("input[type=file]").nth(1).set_input_files(str(tmp_path / "small_label.png"))
    page.wait_for_timeout(500)
    page.get_by_role("button", name="Make pseudo labels").click()
    assert "upload the label PNG of this image" in toast_text(page)
    close_toasts(page)
    page.get_by_role("tab", name="Segment").click()
    page.get_by_role("button", name="Segment", exact=True).click()  # the app keeps serving
    page.get_by_text("image pass cached").wait_for(timeout=30_000)


def test_compare_tab(page, shots):
    page.get_by_role("tab", name="Compare").click()
    page.get_by_role("button", name="Compare teacher and student").click()
    page.get_by_text("agree on").wait_for(timeout=60_000)
    for side in ("teacher", "student"):
        picture = page.locator(f"#compare_{side} img").first
        picture.wait_for(state="visible", timeout=20_000)
        assert picture.get_attribute("src").startswith("data:image/jpeg;base64,")  # inside the response
    assert page.locator("#compare_legend .legend-entry").count() >= 1
    page.wait_for_timeout(500)
    page.screenshot(path=str(shots / "compare.png"), full_page=True)


def test_live_tab_with_a_camera(page, shots, server):
    page.get_by_role("tab", name="Live").click()
    page.get_by_text("Click to Access Webcam").click()
    page.locator("#camera button[aria-label='capture photo']").click()  # start streaming
    page.get_by_text("frames/s here").first.wait_for(timeout=60_000)
    page.locator("#live img").first.wait_for(state="visible", timeout=20_000)
    page.wait_for_timeout(3000)
    page.screenshot(path=str(shots / "live.png"), full_page=True)
    page.locator("#camera button[aria-label='capture photo']").click()  # stop
    assert page.errors == []
    assert "Traceback" not in server[1].read_text()

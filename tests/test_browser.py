"""The web page in a real headless browser (Debian's Chromium driven by Playwright): upload, result card, errors."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from browser import FLAGS, chromium


@pytest.fixture(scope="module")
def server(tiny_bundle: Path) -> Iterator[str]:
    import uvicorn

    from covidscan.serve.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(tiny_bundle), host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started and time.time() < deadline:
        time.sleep(0.05)
    assert instance.started, "server did not start"
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(10)


def test_upload_shows_the_result_card_with_heat_map_and_disclaimer(server: str, tiny_run: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    import pandas as pd
    from playwright.sync_api import sync_playwright
    from skimage import data
    from PIL import Image

    frame = pd.read_csv(tiny_run / "manifest.csv", keep_default_na=False)
    covid = frame[(frame["split"] == "test") & (frame["label"] == "COVID")]["path"].iloc[0]
    photo = tmp_path / "cat.png"
    Image.fromarray(data.chelsea()).save(photo)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=FLAGS[1:], headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 1200})
        page.goto(server + "/")
        assert page.get_by_role("button", name="Analyse").is_disabled()
        # the banner names the model card's training data (here synthetic phantoms), never a fixed claim
        page.wait_for_function("document.getElementById('provenance').textContent.includes('trained on')", timeout=10000)
        import json

        origins = [p["description"] for p in json.loads((tiny_bundle / "model.json").read_text())["training_data"]["provenance"].values()]
        assert origins and all(o in (page.text_content("#provenance") or "") for o in origins)
        assert "public research data" not in (page.text_content("header") or "")
        page.get_by_label("Image files").set_input_files(covid)
        page.get_by_role("button", name="Analyse").click()
        page.wait_for_selector("#result:not([hidden])", timeout=30000)
        label = page.text_content("#label") or ""
        probability = page.text_content("#prob-text") or ""
        assert label in ("COVID suspected", "non-COVID"), label
        assert "Estimated probability of COVID" in probability and "%" in probability
        assert "not a diagnosis" in (page.text_content("#disclaimer") or "")
        assert page.locator("#heat").get_attribute("src", timeout=5000).startswith("data:image/png;base64,")
        page.get_by_label("Heat-map opacity").fill("20")
        assert page.eval_on_selector("#heat", "e => e.style.opacity") == "0.2"
        page.get_by_label("Show heat map").uncheck()
        assert page.locator("#heat").is_hidden()
        page.screenshot(path=str(tmp_path / "result.png"), full_page=True)
        page.get_by_label("Image files").set_input_files(str(photo))
        page.get_by_role("button", name="Analyse").click()
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30000)
        assert "unlike the training data" in (page.text_content("#error") or "")
        browser.close()

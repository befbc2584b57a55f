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


def test_study_viewer_on_300_compressed_extension_less_slices_and_a_nifti_volume(server: str, tiny_run: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    """The radiologist's path of issue 16: a PACS series (JPEG Lossless, no extensions, shuffled names), browse it,
    change window and operating point, print the report; then a NIfTI volume (no broken preview)."""
    import gzip

    import nibabel as nib
    import numpy as np
    from playwright.sync_api import sync_playwright

    from dicom_helpers import phantom_series

    series = phantom_series(tiny_run, tmp_path / "pacs", 300)
    assert all(p.suffix == "" for p in series)
    volume = np.stack([np.full((48, 48), -1000, np.int16)] * 4, axis=2)
    volume[10:30, 10:30] = -700
    nifti = tmp_path / "scan.nii.gz"
    nifti.write_bytes(gzip.compress(nib.Nifti1Image(volume, np.eye(4)).to_bytes()))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=FLAGS[1:], headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 1400})
        page.goto(server + "/")
        page.get_by_label("Image files").set_input_files([str(s) for s in series])
        assert page.is_checked("#study")  # many files: one study
        page.get_by_role("button", name="Analyse").click()
        page.wait_for_selector("#study-viewer:not([hidden])", timeout=120000)
        assert page.locator("#strip span").count() == 300
        assert page.is_visible("#colorbar") and page.is_visible("#study-heat")
        # the uncertain band comes from the model card's screening and rule-in thresholds, not a fixed 20-80 %
        import json

        points = json.loads((tiny_bundle / "model.json").read_text())["calibration"]["operating_points"]
        band = sorted(v for k, v in points.items() if k.startswith(("high sensitivity", "high specificity")))
        assert f"{100 * band[0]:.1f}%" in (page.text_content("#uncertainty") or "") and f"{100 * band[1]:.1f}%" in (page.text_content("#uncertainty") or "")
        start = int(page.input_value("#slice"))
        assert page.text_content("#slice-text") == f"slice {start} of 300"
        page.focus("#stack")
        page.keyboard.press("Home")
        page.keyboard.press("ArrowDown")
        page.keyboard.press("PageDown")
        assert page.text_content("#slice-text") == "slice 12 of 300" and "window=lung" in (page.get_attribute("#study-base", "src") or "")
        page.wait_for_function("document.getElementById('study-base').complete && document.getElementById('study-base').naturalWidth === 256")
        page.select_option("#window", "mediastinum")
        page.wait_for_function("document.getElementById('study-base').src.includes('window=mediastinum') && "
                               "document.getElementById('study-base').complete && document.getElementById('study-base').naturalWidth === 256")
        page.wait_for_function("document.getElementById('study-heat').complete && document.getElementById('study-heat').naturalWidth === 256")
        page.locator("#strip span").nth(199).click()
        assert page.text_content("#slice-text") == "slice 200 of 300"
        options = page.locator("#operating option").all_text_contents()
        assert any(o.startswith("screening") for o in options) and any(o.startswith("rule-in") for o in options)
        rule_in = next(o for o in options if o.startswith("rule-in"))
        page.select_option("#operating", label=rule_in)
        assert "rule-in" in (page.text_content("#operating-text") or "")
        page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)
        page.locator("#study-viewer").screenshot(path=str(tmp_path / "viewer-only.png"))
        page.emulate_media(media="print")
        assert page.is_visible("#report") and not page.is_visible("#form")
        report = page.text_content("#report") or ""
        assert "not a diagnosis" in report and "rule-in" in report and "Doe" not in report
        assert len([c for c in report if c in "0123456789abcdef"]) >= 64  # the study hash
        pdf = page.pdf()
        assert pdf.startswith(b"%PDF") and len(pdf) > 5000
        page.emulate_media(media="screen")
        page.get_by_label("Image files").set_input_files(str(nifti))
        assert page.is_hidden("#preview")  # no broken-image icon for a .nii.gz
        page.get_by_role("button", name="Analyse").click()
        page.wait_for_function("document.getElementById('status').textContent === 'Done.' || document.getElementById('error').textContent.length > 0",
                               timeout=60000)
        error = page.text_content("#error") or ""
        assert not error or "unlike the training data" in error, error  # a result, or the gate's refusal: nothing else
        browser.close()


def test_a_mostly_refused_study_is_not_evaluable_on_the_page_and_its_printout(server: str, tiny_run: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    """Issue 33: no study answer from a sliver of accepted slices; the model's validated figures beside the answer."""
    import json

    from playwright.sync_api import sync_playwright

    from dicom_helpers import mostly_refused_series

    series = mostly_refused_series(tiny_run, tmp_path / "s")
    statement = json.loads((tiny_bundle / "model.json").read_text())["validation"]["statement"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=FLAGS[1:], headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 1400})
        page.goto(server + "/")
        page.wait_for_function("document.getElementById('provenance').textContent.includes('trained on')", timeout=10000)
        page.get_by_label("Image files").set_input_files([str(s) for s in series])
        page.get_by_role("button", name="Analyse").click()
        page.wait_for_selector("#study-viewer:not([hidden])", timeout=60000)
        assert page.text_content("#label") == "not evaluable with this model"
        text = page.text_content("#prob-text") or ""
        assert text.startswith("No study estimate: the input gate refused") and "%" in text and "Estimated probability" not in text
        assert page.text_content("#validated") == statement and not page.text_content("#uncertainty")
        rows = page.eval_on_selector_all("#rows tr", "trs => trs.map(tr => Array.from(tr.cells).map(td => td.textContent))")
        refused_rows = [r for r in rows if r[4].startswith("no: refused")]
        assert refused_rows and all(r[2:4] == ["refused", "—"] for r in refused_rows)  # no suggestion, no probability
        for option in page.locator("#operating option").all_text_contents():  # no operating point turns it into an answer
            page.select_option("#operating", label=option)
            assert page.text_content("#label") == "not evaluable with this model"
            assert "not evaluable with this model" in (page.text_content("#operating-text") or "")
        page.screenshot(path=str(tmp_path / "not-evaluable.png"), full_page=True)
        page.emulate_media(media="print")
        report = page.text_content("#report") or ""
        assert "not evaluable with this model" in report and statement in report and "answered only when" in report
        browser.close()

"""The DICOM node: a PACS sends a study over DICOM (pynetdicom's store SCU), covidscan answers with an SR and a
Secondary Capture, received by a second storage SCP on loopback. No patient field in any log line."""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dicom_helpers import FAKE_PATIENT_ID, FAKE_PATIENT_NAME, LOSSLESS_SYNTAXES, phantom_series


def test_a_study_sent_over_dicom_comes_back_as_sr_and_secondary_capture(
    tiny_bundle: Path, tiny_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pydicom import dcmread
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    from covidscan.serve.dicom_node import SC_CLASS, SR_CLASS, Destination, DicomListener

    received: list[object] = []
    arrived = threading.Event()

    def on_store(event: object) -> int:
        ds = event.dataset  # type: ignore[attr-defined]
        ds.file_meta = event.file_meta  # type: ignore[attr-defined]
        received.append(ds)
        if len(received) == 2:
            arrived.set()
        return 0x0000

    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(SR_CLASS, "1.2.840.10008.1.2.1")
    pacs.add_supported_context(SC_CLASS, "1.2.840.10008.1.2.1")
    pacs_server = pacs.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    caplog.set_level(logging.INFO)
    listener = DicomListener(str(tiny_bundle), Destination("127.0.0.1", pacs_server.server_address[1], "PACS"), port=0, host="127.0.0.1",
                             idle_s=1.0, spool_dir=tmp_path / "spool")
    listener.start()
    try:
        series = phantom_series(tiny_run, tmp_path / "s", 8, LOSSLESS_SYNTAXES["jpeg-lossless"])
        modality = AE(ae_title="CT_SCANNER")
        modality.add_requested_context(CTImageStorage, [LOSSLESS_SYNTAXES["jpeg-lossless"]])
        assoc = modality.associate("127.0.0.1", listener.port, ae_title="COVIDSCAN")
        assert assoc.is_established
        for path in reversed(series):  # sent in the wrong order on purpose
            assert assoc.send_c_store(dcmread(path)).Status == 0x0000
        assoc.release()
        assert arrived.wait(60), "no answer came back"
    finally:
        listener.stop()
        pacs_server.shutdown()
    by_class = {str(ds.SOPClassUID): ds for ds in received}
    sr, sc = by_class[SR_CLASS], by_class[SC_CLASS]
    original = dcmread(series[0])
    for answer in (sr, sc):  # filed under the received study, as a new series
        assert answer.StudyInstanceUID == original.StudyInstanceUID and answer.PatientID == FAKE_PATIENT_ID
        assert answer.SeriesInstanceUID != original.SeriesInstanceUID
    texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue for item in sr.ContentSequence}
    assert "not a diagnosis" in texts["Decision support"]
    assert texts["Study answer"].split(" ")[0] in ("COVID", "non-COVID", "refused:")
    assert "8 slices, ordered by position" in texts["Series"] and len(texts["Study hash"]) == 64
    card = json.loads((tiny_bundle / "model.json").read_text())
    assert texts["Validation"] == card["validation"]["statement"]  # how the model performed, beside the answer
    pixels = sc.pixel_array
    assert sc.BurnedInAnnotation == "YES" and pixels.shape == (256 + 96, 256, 3) and pixels[:256].std() > 5
    assert (pixels[:256, :, 0].astype(int) - pixels[:256, :, 2]).max() > 50  # the heat map's colour is in it
    assert listener.answered == [texts["Study hash"]]
    logs = caplog.text
    assert "sent to PACS" in logs and FAKE_PATIENT_ID not in logs and "Doe" not in logs and "19700101" not in logs
    assert str(original.StudyInstanceUID) not in logs


def test_send_to_is_checked() -> None:
    from covidscan.errors import CovidscanError
    from covidscan.serve.dicom_node import Destination

    assert Destination.parse("10.0.0.5:104:PACS") == Destination("10.0.0.5", 104, "PACS")
    with pytest.raises(CovidscanError, match="HOST:PORT:AE_TITLE"):
        Destination.parse("pacs.local:abc")


def test_a_study_of_a_modality_no_served_model_knows_gets_no_answer(
    tiny_bundle: Path, tiny_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A chest X-ray (DX) study reaching a node that serves a CT model is logged and left unanswered, not scored."""
    import json
    import shutil

    from pydicom import dcmread

    from covidscan.serve.dicom_node import Destination, DicomListener

    ct = tmp_path / "ct"
    shutil.copytree(tiny_bundle, ct)
    card = json.loads((ct / "model.json").read_text())
    card["training_data"]["modality"] = "CT"
    (ct / "model.json").write_text(json.dumps(card))
    series = phantom_series(tiny_run, tmp_path / "s", 4, LOSSLESS_SYNTAXES["explicit"])
    for path in series:
        ds = dcmread(path)
        ds.Modality = "DX"
        ds.save_as(path)
    listener = DicomListener([str(ct)], Destination("127.0.0.1", 9, "PACS"), port=0, host="127.0.0.1",  # never started: no network
                             spool_dir=tmp_path / "spool")
    caplog.set_level(logging.INFO)
    for path in series:
        key = listener.spool.add("1.2.3", path.name, path.read_bytes())
    listener._answer_safely(listener.spool.take(key))
    assert listener.answered == [] and listener.spool.studies() == [] and listener.spool.pending_bytes == 0
    assert "chest X-ray image, and no model served here was trained on that modality" in caplog.text and FAKE_PATIENT_ID not in caplog.text

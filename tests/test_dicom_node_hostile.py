"""The DICOM node against malformed studies and hostile peers (pynetdicom peers on loopback).

Every study carries fake patient values; no log line, warning or captured output may contain one. Each case failed
before its fix: the watcher thread died (and every later study was acknowledged but never answered), a PACS that
refused the SR got nothing, slow peers blocked every new association."""
from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_helpers import LOSSLESS_SYNTAXES, phantom_series

EXPLICIT = LOSSLESS_SYNTAXES["explicit"]
PHI_NAME, PHI_ID, PHI_BIRTH, PHI_ACCESSION = "Hostile^Harriet", "PHI-7731946", "1901-02-03", "ACC-55501"
PHI_VALUES = ("Harriet", PHI_ID, PHI_BIRTH, PHI_ACCESSION)


def _study(tiny_run: Path, folder: Path, number: int, count: int = 4) -> list[Path]:
    """A phantom CT study of its own (StudyInstanceUID) with fake patient values, one of them an invalid DA."""
    from pydicom.uid import generate_uid

    paths = phantom_series(tiny_run, folder, count, EXPLICIT)
    study_uid = generate_uid(entropy_srcs=[str(folder), str(number)])
    for path in paths:
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.PatientName, ds.PatientID, ds.AccessionNumber = study_uid, PHI_NAME, PHI_ID, PHI_ACCESSION
        ds.save_as(path, enforce_file_format=True)
        data = path.read_bytes()  # a birth date pydicom would warn about, quoting it: swap the bytes in
        birth = b"\x10\x00\x30\x00DA\x08\x0019700101"
        assert data.count(birth) == 1
        path.write_bytes(data.replace(birth, b"\x10\x00\x30\x00DA\x0a\x00" + PHI_BIRTH.encode()))
    return paths


def _patient_id_as_us(path: Path) -> None:
    """PatientID stored with VR US and 17 bytes (of the patient's ID)."""
    data = path.read_bytes()
    element = b"\x10\x00\x20\x00LO\x0c\x00" + PHI_ID.encode() + b" "
    assert data.count(element) == 1
    path.write_bytes(data.replace(element, b"\x10\x00\x20\x00US\x11\x00" + (PHI_ID + "-ABCDE").encode()))


def _rows_in_three_bytes(path: Path) -> None:
    data = path.read_bytes()
    at = data.index(b"\x28\x00\x10\x00US\x02\x00")
    path.write_bytes(data[:at] + b"\x28\x00\x10\x00US\x03\x00" + data[at + 8:at + 10] + b"\x00" + data[at + 10:])


def _lut_without_descriptor(path: Path) -> None:
    ds = dcmread(path)
    item = Dataset()
    item.add_new(0x00283006, "US", [0, 1, 2, 3])  # LUTData without the LUTDescriptor it needs
    ds.ModalityLUTSequence = Sequence([item])
    ds.save_as(path, enforce_file_format=True)


@contextmanager
def _pacs(accepts: tuple[str, ...]) -> Iterator[tuple[int, list[object], threading.Event]]:
    """A storage SCP standing for the hospital's PACS: accepts `accepts` SOP classes, keeps what it receives."""
    from pynetdicom import AE, evt

    received: list[object] = []
    arrived = threading.Event()

    def on_store(event: object) -> int:
        received.append(event.dataset)  # type: ignore[attr-defined]
        arrived.set()
        return 0x0000

    pacs = AE(ae_title="PACS")
    for sop_class in accepts:
        pacs.add_supported_context(sop_class, EXPLICIT)
    server = pacs.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield server.server_address[1], received, arrived
    finally:
        server.shutdown()


def _send(port: int, paths: list[Path], source: str = "127.0.0.1") -> list[int]:
    """C-STORE the files as they are on disk (pynetdicom sends a path without decoding it); the statuses."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    scanner = AE(ae_title="CT_SCANNER")
    scanner.add_requested_context(CTImageStorage, EXPLICIT)
    assoc = scanner.associate("127.0.0.1", port, ae_title="COVIDSCAN", bind_address=(source, 0))
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(path).Status) for path in paths]
    finally:
        assoc.release()


def _wait(condition: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_the_node_survives_malformed_studies_answers_the_next_and_logs_no_patient_value(
    tiny_bundle: Path, tiny_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    from covidscan.serve.dicom_node import SC_CLASS, SR_CLASS, Destination, DicomListener

    caplog.set_level(logging.DEBUG)
    with _pacs((SR_CLASS, SC_CLASS)) as (pacs_port, received, arrived):
        listener = DicomListener(str(tiny_bundle), Destination("127.0.0.1", pacs_port, "PACS"), port=0, host="127.0.0.1", idle_s=0.3,
                                 spool_dir=tmp_path / "spool")
        listener.start()
        try:
            bad_id = _study(tiny_run, tmp_path / "bad-id", 1, count=2)
            _patient_id_as_us(bad_id[0])
            statuses = _send(listener.port, bad_id)
            assert statuses[0] != 0x0000 and statuses[1] == 0x0000  # refused on arrival, not queued; the other slice is
            for number, (name, edit) in enumerate([("lut", _lut_without_descriptor), ("rows", _rows_in_three_bytes)], start=2):
                study = _study(tiny_run, tmp_path / name, number, count=2)
                for path in study:
                    edit(path)
                assert _send(listener.port, study) == [0x0000, 0x0000]  # stored; they fail later, in the analysis
            assert _wait(lambda: not listener.spool.studies(), 30), "the malformed studies were never taken"
            assert not arrived.is_set() or len(received) == 2  # only the half-good first study could be answered
            received.clear()
            arrived.clear()
            good = _study(tiny_run, tmp_path / "good", 9)
            assert _send(listener.port, good) == [0x0000] * 4
            assert _wait(lambda: len(received) >= 2, 60), "the node stopped answering after the malformed studies"
            assert listener.worker is not None and listener.worker.is_alive()
        finally:
            listener.stop()
    assert {str(ds.SOPClassUID) for ds in received} == {SR_CLASS, SC_CLASS}
    assert "not analysed" in caplog.text and "instance refused" in caplog.text
    printed = capfd.readouterr()
    for value in PHI_VALUES:
        assert value not in caplog.text and value not in printed.out and value not in printed.err, value


def test_a_pacs_that_refuses_the_sr_still_gets_the_heat_map(
    tiny_bundle: Path, tiny_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from covidscan.serve.dicom_node import SC_CLASS, Destination, DicomListener

    caplog.set_level(logging.INFO)
    with _pacs((SC_CLASS,)) as (pacs_port, received, arrived):
        listener = DicomListener(str(tiny_bundle), Destination("127.0.0.1", pacs_port, "PACS"), port=0, host="127.0.0.1", idle_s=0.3,
                                 spool_dir=tmp_path / "spool")
        listener.start()
        try:
            assert _send(listener.port, _study(tiny_run, tmp_path / "s", 1)) == [0x0000] * 4
            assert arrived.wait(60)
            assert _wait(lambda: listener.answered, 10)
        finally:
            listener.stop()
    assert [str(ds.SOPClassUID) for ds in received] == [SC_CLASS]
    assert "SR not sent: PACS accepts no presentation context for it" in caplog.text


def test_the_node_fails_at_start_when_it_cannot_keep_its_secret_or_its_spool(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from covidscan.errors import CovidscanError
    from covidscan.serve.dicom_node import Destination, DicomListener

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # a path under a file cannot be created, even by root (a read-only home)
    with pytest.raises(CovidscanError, match="spool folder is not writable"):
        DicomListener(str(tiny_bundle), Destination("127.0.0.1", 9, "PACS"), port=0, spool_dir=blocker / "spool")
    monkeypatch.setenv("COVIDSCAN_SECRET_FILE", str(blocker / "covidscan" / "patient-key.secret"))
    with pytest.raises(CovidscanError, match="patient-key secret cannot be created or read.*COVIDSCAN_SECRET_FILE"):
        DicomListener(str(tiny_bundle), Destination("127.0.0.1", 9, "PACS"), port=0, spool_dir=tmp_path / "spool")


def test_the_spool_is_bounded_by_bytes_and_survives_a_restart(tiny_bundle: Path, tiny_run: Path, tmp_path: Path) -> None:
    """Instances wait on disk, not in memory: a full spool refuses with 0xA700; a restarted node answers what it held."""
    from covidscan.serve.dicom_node import SC_CLASS, SR_CLASS, Destination, DicomListener, NodeLimits

    study = _study(tiny_run, tmp_path / "s", 1)
    one = study[0].stat().st_size
    with _pacs((SR_CLASS, SC_CLASS)) as (pacs_port, received, arrived):
        destination = Destination("127.0.0.1", pacs_port, "PACS")
        small = NodeLimits(spool_bytes=int(2.5 * one))
        listener = DicomListener(str(tiny_bundle), destination, port=0, host="127.0.0.1", idle_s=3600, spool_dir=tmp_path / "spool",
                                 limits=small)
        listener.start()
        try:
            assert _send(listener.port, study) == [0x0000, 0x0000, 0xA700, 0xA700]
        finally:
            listener.stop()  # stopped before the study was complete: the two instances stay in the spool
        assert len(list((tmp_path / "spool").rglob("*.dcm"))) == 2 and not arrived.is_set()
        restarted = DicomListener(str(tiny_bundle), destination, port=0, host="127.0.0.1", idle_s=0.2, spool_dir=tmp_path / "spool")
        assert restarted.spool.pending_bytes >= 2 * one - 1024
        restarted.start()
        try:
            assert _wait(lambda: len(received) >= 2, 60), "the restarted node did not answer the spooled study"
        finally:
            restarted.stop()
    assert restarted.spool.pending_bytes == 0 and not list((tmp_path / "spool").rglob("*.dcm"))


def _partial_association_request() -> bytes:
    """The first 8 bytes of an A-ASSOCIATE-RQ (type 1, length 300, protocol version) and nothing after."""
    return struct.pack(">BBIH", 0x01, 0x00, 300, 0x0001)


def test_slow_and_idle_peers_do_not_block_a_legitimate_echo(tiny_bundle: Path, tmp_path: Path) -> None:
    """10 connections from one peer that send 8 bytes of an association request and stop, 12 idle TCP connections
    from another, 6 established associations that then stay silent from a third: a fourth peer's C-ECHO is answered
    at once; the half-open connections are dropped after the connect time-out and the silent associations after the
    idle time-out. (Before: pynetdicom's 10 associations were held for as long as the sockets stayed open.)"""
    from pynetdicom import AE

    from covidscan.serve.dicom_node import Destination, DicomListener, NodeLimits

    limits = NodeLimits(max_associations=16, per_peer=4, connect_timeout_s=2.0, idle_timeout_s=5.0)
    listener = DicomListener(str(tiny_bundle), Destination("127.0.0.1", 9, "PACS"), port=0, host="0.0.0.0", spool_dir=tmp_path / "spool",
                             limits=limits)
    listener.start()
    attackers: list[socket.socket] = []
    try:
        for source, count, payload in (("127.0.0.2", 10, _partial_association_request()), ("127.0.0.3", 12, b"")):
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", listener.port), timeout=5, source_address=(source, 0))
                if payload:
                    sock.sendall(payload)
                attackers.append(sock)
        idle_peer = AE(ae_title="IDLE")
        idle_peer.add_requested_context("1.2.840.10008.1.1")
        held = [idle_peer.associate("127.0.0.1", listener.port, ae_title="COVIDSCAN", bind_address=("127.0.0.4", 0)) for _ in range(6)]
        assert [a.is_established for a in held] == [True] * 4 + [False] * 2  # established, then silent: 4 per peer
        time.sleep(0.5)
        started = time.monotonic()
        scu = AE(ae_title="WARD")
        scu.add_requested_context("1.2.840.10008.1.1")
        assoc = scu.associate("127.0.0.1", listener.port, ae_title="COVIDSCAN")
        assert assoc.is_established, "a legitimate peer was refused while others held the node"
        assert int(assoc.send_c_echo().Status) == 0x0000
        assoc.release()
        assert time.monotonic() - started < 3.0
        for sock in attackers[:10]:  # the half-open association requests are cut after the connect time-out
            sock.settimeout(limits.connect_timeout_s + 4)
            assert sock.recv(1) == b""
        assert _wait(lambda: not any(a.is_established for a in held), limits.idle_timeout_s + 5), "silent associations were kept"
    finally:
        for sock in attackers:
            sock.close()
        listener.stop()


def test_node_limits_are_checked() -> None:
    from covidscan.errors import CovidscanError
    from covidscan.serve.dicom_node import NodeLimits

    with pytest.raises(CovidscanError, match="per-peer"):
        NodeLimits(max_associations=2, per_peer=3)
    with pytest.raises(CovidscanError, match="positive"):
        NodeLimits(connect_timeout_s=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_answer_survives_a_destination_that_is_down_and_a_restart_and_arrives_once(
    tiny_bundle: Path, tiny_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Analysed while the PACS is down: the answer waits in the outbox; the node stops; restarted with the PACS up,
    it delivers that answer without analysing the study again, and the PACS receives one SR and one SC."""
    from covidscan.serve.dicom_node import SC_CLASS, SR_CLASS, Destination, DicomListener

    caplog.set_level(logging.INFO)
    down = Destination("127.0.0.1", _free_port(), "PACS")  # nothing listens there
    first = DicomListener(str(tiny_bundle), down, port=0, idle_s=0.2, spool_dir=tmp_path / "spool", retry_s=3600)
    first.start()
    try:
        assert _send(first.port, _study(tiny_run, tmp_path / "s", 1)) == [0x0000] * 4
        assert _wait(lambda: first.analysed and "attempt 1 of 8" in caplog.text, 60)
    finally:
        first.stop()
    assert first.answered == [] and len(list((tmp_path / "spool" / "outbox").rglob("*.dcm"))) == 2
    with _pacs((SR_CLASS, SC_CLASS)) as (pacs_port, received, arrived):
        second = DicomListener(str(tiny_bundle), Destination("127.0.0.1", pacs_port, "PACS"), port=0, idle_s=0.2,
                               spool_dir=tmp_path / "spool")
        second.start()
        try:
            assert _wait(lambda: second.answered, 30), "the stored answer was not delivered after the restart"
            time.sleep(1.0)
        finally:
            second.stop()
    assert second.analysed == [] and second.answered == first.analysed  # delivered, not analysed again
    assert sorted(str(ds.SOPClassUID) for ds in received) == sorted([SR_CLASS, SC_CLASS])  # exactly once
    assert not list((tmp_path / "spool").rglob("*.dcm"))
    audits = [json.loads(r.getMessage()) for r in caplog.records if r.name == "covidscan.audit"]
    assert len(audits) == 1  # one analysis, one audit line
    line = audits[0]
    assert line["source"] == "dicom-node" and line["study"].startswith("sk-") and line["model_version"] and line["slices"] == 4
    assert line["answer"] in ("COVID", "non-COVID", "refused", "not evaluable") and "threshold" in line["operating_point"]
    for value in PHI_VALUES:
        assert value not in json.dumps(audits)


def test_an_undeliverable_answer_moves_to_dead_letter_after_the_stated_attempts(
    tiny_bundle: Path, tiny_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import json

    from covidscan.serve.dicom_node import Destination, DicomListener

    caplog.set_level(logging.INFO)
    down = Destination("127.0.0.1", _free_port(), "PACS")
    listener = DicomListener(str(tiny_bundle), down, port=0, idle_s=0.2, spool_dir=tmp_path / "spool", retry_s=0.2, attempts=3)
    listener.start()
    try:
        assert _send(listener.port, _study(tiny_run, tmp_path / "s", 1)) == [0x0000] * 4
        assert _wait(lambda: list((tmp_path / "spool" / "dead-letter").glob("*/state.json")), 60), "never moved to dead-letter"
    finally:
        listener.stop()
    state = json.loads(next((tmp_path / "spool" / "dead-letter").glob("*/state.json")).read_text())
    assert state["attempts"] == 3 and "cannot reach PACS" in state["last_error"]
    assert "attempt 1 of 3" in caplog.text and "attempt 2 of 3" in caplog.text and "answer moved to" in caplog.text
    assert len(list((tmp_path / "spool" / "dead-letter").rglob("*.dcm"))) == 2 and listener.answered == []


def test_unknown_calling_and_called_ae_titles_are_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    from pynetdicom import AE

    from covidscan.serve.dicom_node import Destination, DicomListener

    listener = DicomListener(str(tiny_bundle), Destination("127.0.0.1", 9, "PACS"), port=0, spool_dir=tmp_path / "spool",
                             allowed_callers=("CT_SCANNER",))
    listener.start()
    try:
        def associates(calling: str, called: str) -> bool:
            ae = AE(ae_title=calling)
            ae.add_requested_context("1.2.840.10008.1.1")
            assoc = ae.associate("127.0.0.1", listener.port, ae_title=called)
            established = bool(assoc.is_established)
            if established:
                assoc.release()
            return established

        assert associates("CT_SCANNER", "COVIDSCAN")
        assert not associates("INTRUDER", "COVIDSCAN")
        assert not associates("CT_SCANNER", "SOMEONE_ELSE")
    finally:
        listener.stop()


def test_a_study_sent_again_unchanged_gets_one_answer(tiny_bundle: Path, tiny_run: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The same study (same StudyInstanceUID and instances) sent twice: one analysis, one SR and one SC; the same
    study with one more instance is a new answer."""
    from covidscan.serve.dicom_node import SC_CLASS, SR_CLASS, Destination, DicomListener

    caplog.set_level(logging.INFO)
    study = _study(tiny_run, tmp_path / "s", 1, count=5)
    with _pacs((SR_CLASS, SC_CLASS)) as (pacs_port, received, arrived):
        listener = DicomListener(str(tiny_bundle), Destination("127.0.0.1", pacs_port, "PACS"), port=0, idle_s=0.2,
                                 spool_dir=tmp_path / "spool")
        listener.start()
        try:
            assert _send(listener.port, study[:4]) == [0x0000] * 4
            assert _wait(lambda: len(received) >= 2, 60)
            assert _send(listener.port, study[:4]) == [0x0000] * 4  # again, unchanged
            assert _wait(lambda: "sent again with the same 4 instances" in caplog.text, 30)
            assert len(received) == 2 and len(listener.analysed) == 1
            assert _send(listener.port, study) == [0x0000] * 5  # one more slice: a new answer
            assert _wait(lambda: len(received) >= 4, 60)
        finally:
            listener.stop()
    assert len(listener.analysed) == 2 and len(received) == 4


def test_dicom_over_tls_answers_a_tls_peer_and_refuses_a_plain_one(tiny_bundle: Path, tmp_path: Path) -> None:
    """The node with a certificate (tests/tls, self-signed, test only): a peer that trusts it gets its C-ECHO
    answered over TLS; a plain-TCP peer gets no association; a peer that connects and never starts TLS does not
    hold the node past the connect time-out."""
    import ssl

    from pynetdicom import AE

    from covidscan.serve.dicom_node import Destination, DicomListener, NodeLimits, TlsSettings

    tls_dir = Path(__file__).parent / "tls"
    listener = DicomListener(str(tiny_bundle), Destination("127.0.0.1", 9, "PACS"), port=0, spool_dir=tmp_path / "spool",
                             limits=NodeLimits(connect_timeout_s=2.0), tls=TlsSettings(tls_dir / "node.crt", tls_dir / "node.key"))
    listener.start()
    silent = socket.create_connection(("127.0.0.1", listener.port), timeout=5)  # never sends a ClientHello
    try:
        time.sleep(2.5)
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls_dir / "node.crt"))
        ae = AE(ae_title="WARD")
        ae.acse_timeout = ae.network_timeout = 5
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="COVIDSCAN", tls_args=(client, "127.0.0.1"))
        assert assoc.is_established, "a TLS peer was refused"
        assert int(assoc.send_c_echo().Status) == 0x0000
        assoc.release()
        plain = ae.associate("127.0.0.1", listener.port, ae_title="COVIDSCAN")
        assert not plain.is_established
    finally:
        silent.close()
        listener.stop()
        socket.setdefaulttimeout(None)

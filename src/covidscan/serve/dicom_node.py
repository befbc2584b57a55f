"""A DICOM node for hospitals: receive a CT study from a PACS, analyse it, send the answer back as DICOM.

`covidscan dicom-listen BUNDLE` runs a storage SCP (pynetdicom). Each received
instance goes to the spool on disk (serve/spool.py; bounded in bytes, kept over
a restart); a study counts as complete when no instance of it has arrived for
`idle_s` seconds (what Orthanc calls a stable study). It is then analysed
exactly as the service analyses an upload (series choice, order, gate, the
model card's study rule) and the answer goes back, by C-STORE, to the
configured AE as

- a Basic Text SR: study answer, probability, rule and threshold, slices used and
  refused, series and order, model version and the decision-support statement;
- a Secondary Capture: the most suspicious slice with its heat map, colour bar
  and the same statement burned in.

Both are new series of the received study (its patient and study identifiers are
copied into them, which PACS needs to file them); no patient field is ever
logged: log lines name a study by a hash, and errors from parsers are logged by
type with every quoted value blanked (`errors.exception_summary`).

A node that never dies silently: every failure while receiving, planning,
analysing or sending is caught per instance or per study, logged, and the node
goes on with the next. An instance it cannot use is refused (never queued). An
answer waits in the spool's outbox until delivered: retried after `retry_s`,
then twice as long, ..., `attempts` times, then moved to `dead-letter/` with the
reason; a destination that refuses one of the two answers still gets the other.
Access: the called AE title must be the node's own, and with `allowed_callers`
only those calling AE titles are accepted; the node listens on 127.0.0.1 unless
told otherwise; `TlsSettings` puts incoming associations (and, with a CA for the
destination, the answers) on TLS.

Network hygiene (`NodeLimits`, each a `dicom-listen` option): at most
`max_associations` associations at once and `per_peer` from one IP address (a
peer over its share is disconnected at once, so one peer cannot starve the
others); a connection must finish association negotiation within
`connect_timeout_s` (the ARTIM timer, enforced by a watchdog even when a peer
sends part of a PDU and stops); an association or a partial PDU silent for
`idle_timeout_s` is closed (pynetdicom's network timeout); a DIMSE answer is
awaited `dimse_timeout_s`.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidscan import DISCLAIMER
from covidscan.data.io import quiet_pydicom
from covidscan.data.pseudonym import study_key
from covidscan.decision import StudyAnswer, rule_text
from covidscan.errors import CovidscanError, ImageReadError, exception_summary
from covidscan.serve.audit import audit_analysis
from covidscan.serve.predictor import Bundle, EnsembleBundle
from covidscan.serve.router import NoModelForModality, load_router
from covidscan.serve.spool import DEFAULT_SPOOL_BYTES, AnsweredLedger, Outbox, Spool, SpoolFull, default_spool_dir
from covidscan.serve.study_view import StudyAnalysis, analyse_routed_study

log = logging.getLogger("covidscan.dicom")

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR Storage
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
_PATIENT_AND_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
                      "StudyID", "AccessionNumber", "ReferringPhysicianName")
RETRY_S = 60.0  # an answer that could not be delivered is tried again after this long, then twice as long, ...
DELIVERY_ATTEMPTS = 8  # ... 8 attempts, the last 60 x (2^7 - 1) s = about 2 hours after the first, then the answer moves to the spool's dead-letter/ folder
STATUS_SUCCESS, STATUS_OUT_OF_RESOURCES, STATUS_CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


@dataclass(frozen=True)
class NodeLimits:
    """What one peer, or all of them, may hold of the node (module docstring); the defaults are documented in the README."""

    max_associations: int = 16
    per_peer: int = 4
    connect_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0
    dimse_timeout_s: float = 30.0
    spool_bytes: int = DEFAULT_SPOOL_BYTES

    def __post_init__(self) -> None:
        if self.max_associations < 1 or not 1 <= self.per_peer <= self.max_associations:
            raise CovidscanError(f"association limits: need 1 <= per-peer ({self.per_peer}) <= maximum ({self.max_associations})")
        if min(self.connect_timeout_s, self.idle_timeout_s, self.dimse_timeout_s) <= 0:
            raise CovidscanError("DICOM time-outs must be positive")


@dataclass
class Destination:
    host: str
    port: int
    ae_title: str

    @classmethod
    def parse(cls, text: str) -> Destination:
        """HOST:PORT:AE_TITLE, e.g. 127.0.0.1:11113:PACS."""
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2]:
            raise CovidscanError(f"--send-to {text!r}: expected HOST:PORT:AE_TITLE, e.g. 10.0.0.5:104:PACS")
        return cls(parts[0], int(parts[1]), parts[2])


def _identifiers(ds: object) -> object:
    """The patient and study module the answer is filed under. Raises (whatever pydicom raises) when one of its
    elements cannot be read or written, e.g. a PatientID stored with VR US: such an instance is refused on arrival."""
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    kept = Dataset()
    for keyword in _PATIENT_AND_STUDY:
        if keyword in ds:  # type: ignore[operator]
            setattr(kept, keyword, getattr(ds, keyword))
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, kept)  # the answer will have to write them: fail now, not after the analysis
    return kept


def _new_instance(identifiers: object, sop_class: str, modality: str, series_number: int, description: str) -> object:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.update(identifiers)  # type: ignore[arg-type]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), series_number, 1
    ds.Modality, ds.SeriesDescription = modality, description
    ds.Manufacturer, ds.ContentDate, ds.ContentTime = "covidscan", time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    return ds


def answer_lines(analysis: StudyAnalysis, bundle: Bundle | EnsembleBundle, study: StudyAnswer | None = None) -> list[tuple[str, str]]:
    """The answer as (name, text) pairs: the SR's items and the Secondary Capture's burned-in text (`study`: the
    study answer when the caller has it already)."""
    study = study or bundle.study(analysis.results)
    if study.answered:
        answer = f"{study.label} (probability {study.probability:.3f})"
    elif study.used:
        answer = f"{study.label} with this model: {study.reason}"
    else:
        answer = "refused: no slice is like the model's training data"
    lines = [
        ("Decision support", DISCLAIMER),
        ("Study answer", answer),
        ("Study rule", f"{rule_text(bundle.study_rule)}; {bundle.evidence_rule.describe()}"),
        ("Slices", f"{study.used} used, {study.refused} refused by the input gate as unlike the training data; "
                   f"{study.lung_slices} of {study.total} show lung"),
        ("Series", f"{analysis.plan.describe()}"),
        ("Model", bundle.version),
        ("Study hash", analysis.study_hash),
    ]
    if bundle.validated:
        lines.insert(2, ("Validation", bundle.validated))
    return lines


def structured_report(lines: list[tuple[str, str]], identifiers: object) -> object:
    """A Basic Text SR with the study answer (a container of TEXT items)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    def code(value: str, meaning: str) -> Dataset:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "99COVIDSCAN", meaning
        return item

    ds = _new_instance(identifiers, SR_CLASS, "SR", 9001, "covidscan: COVID-19 decision support")
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ConceptNameCodeSequence = Sequence([code("CS-REPORT", "covidscan decision support report")])
    items = []
    for index, (name, text) in enumerate(lines):
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
        item.ConceptNameCodeSequence = Sequence([code(f"CS-{index}", name)])
        item.TextValue = text[:1024]
        items.append(item)
    ds.ContentSequence = Sequence(items)
    return ds


def secondary_capture(analysis: StudyAnalysis, bundle: Bundle | EnsembleBundle, lines: list[tuple[str, str]], identifiers: object) -> object:
    """The most suspicious accepted slice with its heat map and the answer burned in (RGB Secondary Capture)."""
    from PIL import Image, ImageDraw

    from covidscan.explain.overlay import colorize, overlay

    positive = bundle.classes[-1]
    accepted = [i for i, r in enumerate(analysis.results) if r.in_distribution] or list(range(len(analysis.results)))
    best = max(accepted, key=lambda i: analysis.results[i].probabilities[positive])
    view = analysis.view
    rgb = overlay(view.gray_slice(best), view.heat[best].astype(np.float32) / 255.0, opacity=0.45)
    size = rgb.shape[0]
    canvas = Image.new("RGB", (size, size + 96), "black")
    canvas.paste(Image.fromarray(rgb), (0, 0))
    bar = colorize(np.tile(np.linspace(0, 1, size, dtype=np.float32), (8, 1)))
    canvas.paste(Image.fromarray(bar), (0, size + 2))
    draw = ImageDraw.Draw(canvas)
    named = dict(lines)
    text = [f"slice {best + 1} of {len(analysis.results)}   heat: low -> high", named["Study answer"][:60], "DECISION SUPPORT ONLY - NOT A DIAGNOSIS",
            named["Model"][:60]]
    for row, line in enumerate(text):
        draw.text((4, size + 14 + 19 * row), line, fill=(255, 255, 0) if row == 2 else (255, 255, 255))
    pixels = np.asarray(canvas, np.uint8)
    ds = _new_instance(identifiers, SC_CLASS, "OT", 9002, "covidscan: heat map (decision support)")
    ds.ConversionType, ds.BurnedInAnnotation, ds.ImageType = "WSD", "YES", ["DERIVED", "SECONDARY"]
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    return ds


def send(datasets: list[object], destination: Destination, calling_ae: str, limits: NodeLimits | None = None,
         tls: tuple[ssl.SSLContext, str] | None = None) -> list[int | None]:
    """C-STORE each data set to the destination; returns one status per data set (0 = success; None: the destination
    accepts no presentation context for its SOP class, so it was not sent, and the others still were)."""
    from pynetdicom import AE

    limits = limits or NodeLimits()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = limits.connect_timeout_s, limits.dimse_timeout_s, limits.idle_timeout_s
    for ds in datasets:
        ae.add_requested_context(str(ds.SOPClassUID), "1.2.840.10008.1.2.1")  # type: ignore[attr-defined]
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls)
    if not assoc.is_established:
        raise CovidscanError(f"cannot reach {destination.ae_title} at {destination.host}:{destination.port} (association refused or failed)")
    try:
        accepted = {str(context.abstract_syntax) for context in assoc.accepted_contexts}
        statuses: list[int | None] = []
        for ds in datasets:
            if str(ds.SOPClassUID) not in accepted:  # type: ignore[attr-defined]
                statuses.append(None)
                continue
            try:
                status = assoc.send_c_store(ds)
                statuses.append(int(getattr(status, "Status", 0xC000)) if status else 0xC000)
            except Exception as exc:  # a refused or broken transfer of one answer must not stop the other
                log.error("sending one answer to %s failed: %s", destination.ae_title, exception_summary(exc))
                statuses.append(0xC000)
        return statuses
    finally:
        assoc.release()


def check_patient_key_secret() -> None:
    """Fail at start, not at the first study, when the patient-key secret cannot be made or read (read-only home)."""
    from covidscan.data.pseudonym import patient_key, secret_path

    try:
        patient_key("covidscan start-up check")
    except OSError as exc:
        raise CovidscanError(f"{secret_path()}: the patient-key secret cannot be created or read ({exc.strerror}); set "
                             f"COVIDSCAN_SECRET_FILE to a writable file, or mount the installation's secret there") from None


@dataclass(frozen=True)
class TlsSettings:
    """DICOM over TLS (PS3.15 B.1; pynetdicom's ssl contexts): the node's certificate and key for incoming
    associations; `client_ca` also requires and checks a certificate from every peer; `destination_ca` sends the
    answers over TLS, checking the destination's certificate against it."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    destination_ca: Path | None = None

    def server_context(self) -> ssl.SSLContext | None:
        if self.cert is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(self.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise CovidscanError(f"TLS: cannot load the certificate {self.cert} / key {self.key} / CA {self.client_ca} ({exc})") from None
        return context

    def client_args(self, host: str) -> tuple[ssl.SSLContext, str] | None:
        if self.destination_ca is None:
            return None
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.destination_ca))
        except (OSError, ssl.SSLError) as exc:
            raise CovidscanError(f"TLS: cannot load the destination's CA {self.destination_ca} ({exc})") from None
        if self.cert is not None:
            context.load_cert_chain(self.cert, self.key)  # the destination may ask for the node's certificate
        return context, host


@dataclass
class _Connection:
    peer: str
    opened: float
    sock: socket.socket | None
    established: bool = False


class DicomListener:
    """Storage SCP + spool + study completion + answer by C-STORE. `start()` returns at once; `stop()` ends it."""

    def __init__(self, bundle_dirs: str | list[str], destination: Destination, port: int = 11112, host: str = "127.0.0.1",
                 ae_title: str = "COVIDSCAN", idle_s: float = 10.0, max_slices: int = 1024, spool_dir: str | Path | None = None,
                 limits: NodeLimits | None = None, allowed_callers: tuple[str, ...] = (), retry_s: float = RETRY_S,
                 attempts: int = DELIVERY_ATTEMPTS, tls: TlsSettings | None = None) -> None:
        """Several bundles: one per modality; each study goes to the model of its Modality tag (serve/router.py).
        `allowed_callers`: the calling AE titles accepted (empty: any); the called AE title must be `ae_title`.
        Fails here, with a clear error, when the spool folder or the patient-key secret cannot be written."""
        check_patient_key_secret()
        self.limits = limits or NodeLimits()
        spool_root = Path(spool_dir) if spool_dir else default_spool_dir()
        self.spool = Spool(spool_root, self.limits.spool_bytes)
        self.outbox = Outbox(spool_root, retry_s, max(1, attempts))
        self.ledger = AnsweredLedger(spool_root)
        self.allowed_callers = tuple(allowed_callers)
        self.tls = tls or TlsSettings()
        self.server_tls = self.tls.server_context()  # a bad certificate stops the node here, not at the first peer
        self.analysed: list[str] = []  # study hashes analysed (an answer put in the outbox), for callers and tests
        folders = [bundle_dirs] if isinstance(bundle_dirs, str) else list(bundle_dirs)
        self.router = load_router(folders)
        self.destination, self.port, self.host, self.ae_title, self.idle_s, self.max_slices = destination, port, host, ae_title, idle_s, max_slices
        self.lock = threading.Lock()
        self.connections: dict[int, _Connection] = {}
        self.done = threading.Event()
        self.answered: list[str] = []  # study hashes answered, for callers and tests
        self.server: object | None = None
        self.worker: threading.Thread | None = None

    # --- receiving -------------------------------------------------------------------------------------------
    def _on_store(self, event: object) -> int:
        """Spool one instance; refuse (never queue) one whose identifiers cannot be read or written."""
        try:
            ds = event.dataset  # type: ignore[attr-defined]
            _identifiers(ds)
            study_uid = str(getattr(ds, "StudyInstanceUID", "") or "no-study-uid")
            instance_uid = str(getattr(ds, "SOPInstanceUID", "") or event.request.AffectedSOPInstanceUID)  # type: ignore[attr-defined]
            self.spool.add(study_uid, instance_uid, event.encoded_dataset(include_meta=True))  # type: ignore[attr-defined]
        except SpoolFull as exc:
            log.warning("instance refused: %s", exc)
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:
            log.warning("instance refused: %s", exception_summary(exc))
            return STATUS_CANNOT_UNDERSTAND
        return STATUS_SUCCESS

    def _on_open(self, event: object) -> None:
        """Count the peer's connections; one over its share (or over the total) is disconnected at once."""
        assoc = event.assoc  # type: ignore[attr-defined]
        peer = str(event.address[0])  # type: ignore[attr-defined]
        sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
        with self.lock:
            mine = sum(c.peer == peer for c in self.connections.values())
            over = mine >= self.limits.per_peer or len(self.connections) >= self.limits.max_associations
            if not over:
                self.connections[id(assoc)] = _Connection(peer, time.monotonic(), sock)
        if over:
            log.warning("connection from %s closed: %s", peer, "over its per-peer limit" if mine >= self.limits.per_peer
                        else "over the association limit")
            _close(sock)

    def _on_established(self, event: object) -> None:
        with self.lock:
            connection = self.connections.get(id(event.assoc))  # type: ignore[attr-defined]
            if connection is not None:
                connection.established = True

    def _on_close(self, event: object) -> None:
        with self.lock:
            self.connections.pop(id(event.assoc), None)  # type: ignore[attr-defined]

    def _enforce_connect_timeout(self) -> None:
        """The ARTIM timer for peers that connect and never finish negotiating (a partial PDU blocks pynetdicom's own)."""
        now = time.monotonic()
        with self.lock:
            late = [(key, c) for key, c in self.connections.items()
                    if not c.established and now - c.opened > self.limits.connect_timeout_s]
            for key, _ in late:
                self.connections.pop(key, None)
        for _, connection in late:
            log.warning("connection from %s closed: no association within %.0f s", connection.peer, self.limits.connect_timeout_s)
            _close(connection.sock)

    def start(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt

        quiet_pydicom()
        ae = AE(ae_title=self.ae_title)
        # the limits are enforced per connection in _on_open; pynetdicom's own count also holds connections being torn down
        ae.maximum_associations = 4 * self.limits.max_associations
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = (self.limits.connect_timeout_s, self.limits.dimse_timeout_s,
                                                                 self.limits.idle_timeout_s)
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context("1.2.840.10008.1.1")  # verification (C-ECHO)
        ae.require_called_aet = True  # an association addressed to another AE title is rejected
        if self.allowed_callers:
            ae.require_calling_aet = list(self.allowed_callers)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_OPEN, self._on_open),
                    (evt.EVT_ESTABLISHED, self._on_established), (evt.EVT_CONN_CLOSE, self._on_close)]
        if self.server_tls is not None:
            # pynetdicom runs the TLS handshake in its accept loop: a peer that connects and never starts TLS would
            # hold every new connection. Accepted sockets take the default time-out, so the handshake gives up after
            # the connect time-out (process-wide: the node's process only opens DICOM sockets).
            socket.setdefaulttimeout(self.limits.connect_timeout_s)
        self.server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers, ssl_context=self.server_tls)
        self.port = self.server.server_address[1]  # type: ignore[attr-defined]
        self.worker = threading.Thread(target=self._watch, daemon=True, name="covidscan-dicom-studies")
        self.worker.start()
        waiting = self.spool.studies()
        log.info("listening as %s on port %d; answers go to %s; %d association(s) at most, %d per peer; spool %s%s",
                 self.ae_title, self.port, self.destination.ae_title, self.limits.max_associations, self.limits.per_peer,
                 self.spool.root, f" ({len(waiting)} stud{'y' if len(waiting) == 1 else 'ies'} from before the restart)" if waiting else "")

    def stop(self) -> None:
        self.done.set()
        if self.server is not None:
            self.server.shutdown()  # type: ignore[attr-defined]
        if self.worker is not None:
            self.worker.join(30)

    # --- answering -------------------------------------------------------------------------------------------
    def _watch(self) -> None:
        """The study loop: nothing that goes wrong with one study stops it."""
        while not self.done.wait(0.2):
            self._enforce_connect_timeout()
            for key in self.spool.ready(self.idle_s):
                if self.done.is_set():
                    return
                if self.outbox.has(key):  # analysed before a restart: its answer waits in the outbox
                    self.spool.remove(key)
                    continue
                try:
                    claimed = self.spool.take(key)
                except OSError as exc:
                    log.error("study %s could not be taken from the spool: %s", key[:12], exception_summary(exc))
                    continue
                self._answer_safely(claimed)
            for key in self.outbox.due():
                if self.done.is_set():
                    return
                try:
                    self._deliver(key)
                except Exception as exc:  # the answer on disk cannot be read: set it aside, never stop the loop
                    log.error("answer %s moved to dead-letter/: %s", key[:12], exception_summary(exc))
                    self.outbox.bury(key, exception_summary(exc))

    def _answer_safely(self, key: str) -> None:
        try:
            self._answer(key)
        except Exception as exc:  # a bug or an input no check foresaw: logged without values, the node goes on
            log.error("study %s not answered: %s", key[:12], exception_summary(exc))
            self.spool.remove(key)  # analysing it again would fail again
            return
        if self.outbox.has(key):
            self._deliver(key)

    def _answer(self, key: str) -> None:
        """Analyse the spooled study `key`; its answer goes to the outbox before its instances are deleted. A study
        answered before with exactly these instances (sent again) is not analysed again: the earlier answer stands."""
        from pydicom import dcmread

        started = time.perf_counter()
        files = self.spool.files(key)
        signature = AnsweredLedger.signature(key, list(files))
        if self.ledger.seen(signature):
            log.info("study %s: sent again with the same %d instances; already answered, not analysed again", key[:12], len(files))
            self.spool.remove(key)
            return
        try:
            analysis, served, _ = analyse_routed_study(self.router, files, self.max_slices)
        except (ImageReadError, NoModelForModality) as exc:
            log.warning("study %s of %d instances not analysed: %s", key[:12], len(files), getattr(exc, "problem", None) or exc)
            self.spool.remove(key)
            return
        first = self.spool.first_file(key)
        identifiers = _identifiers(dcmread(first, stop_before_pixels=True)) if first else None
        study = served.bundle.study(analysis.results)
        lines = answer_lines(analysis, served.bundle, study)
        reply = [structured_report(lines, identifiers), secondary_capture(analysis, served.bundle, lines, identifiers)]
        self.outbox.put(key, reply, analysis.study_hash)
        self.ledger.add(signature)  # recorded once the answer is durable: a re-sent study gets this answer, not a second one
        self.spool.remove(key)
        self.analysed.append(analysis.study_hash)
        seconds = time.perf_counter() - started
        log.info("study %s: %d slices analysed in %.1f s, %d file(s) skipped", analysis.study_hash[:12], len(analysis.results),
                 seconds, len(analysis.skipped))
        uid = str(getattr(identifiers, "StudyInstanceUID", "") or "")
        audit_analysis("dicom-node", study_key(uid) if uid else f"ch-{analysis.study_hash[:16]}", served.name, served.bundle.version,
                       study.label, study.probability if study.answered else None, f"study rule {rule_text(served.bundle.study_rule)}",
                       study.total, study.refused, seconds)

    def _deliver(self, key: str) -> None:
        """Send one answer from the outbox; a failure is retried with back-off, then moved to dead-letter/."""
        state = self.outbox.state(key)
        study = str(state["study"])
        try:
            statuses = send(self.outbox.load(key), self.destination, self.ae_title, self.limits, self.tls.client_args(self.destination.host))
            refused = [s for s in statuses if s is not None and s != STATUS_SUCCESS]
            if refused:
                raise CovidscanError(f"{self.destination.ae_title} answered " + ",".join(f"0x{s:04X}" for s in refused))
        except Exception as exc:
            reason = str(exc) if isinstance(exc, CovidscanError) else exception_summary(exc)
            delay = self.outbox.failed(key, reason)
            if delay is None:
                log.error("study %s: answer moved to %s after %d failed deliveries: %s", study[:12], self.outbox.dead / key,
                          self.outbox.attempts, reason)
            else:
                log.error("study %s: answer not delivered (attempt %d of %d; next in %.0f s): %s", study[:12],
                          int(state["attempts"]) + 1, self.outbox.attempts, delay, reason)
            return
        for kind, status in zip(("SR", "heat-map Secondary Capture"), statuses):
            if status is None:
                log.error("study %s: %s not sent: %s accepts no presentation context for it", study[:12], kind, self.destination.ae_title)
        self.outbox.delivered(key)
        self.answered.append(study)
        log.info("study %s: answer sent to %s (statuses %s)", study[:12], self.destination.ae_title,
                 ",".join("not accepted" if s is None else f"0x{s:04X}" for s in statuses))


def _close(sock: socket.socket | None) -> None:
    """Disconnect a peer: a blocked read in pynetdicom's thread returns and the association ends."""
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass

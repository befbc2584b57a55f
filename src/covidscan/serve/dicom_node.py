"""A DICOM node for hospitals: receive a CT study from a PACS, analyse it, send the answer back as DICOM.

`covidscan dicom-listen BUNDLE` runs a storage SCP (pynetdicom). Instances are
held in memory per study; a study counts as complete when no instance of it
has arrived for `idle_s` seconds (what Orthanc calls a stable study). It is
then analysed exactly as the service analyses an upload (series choice, order,
gate, the model card's study rule) and the answer goes back, by C-STORE, to the
configured AE as

- a Basic Text SR: study answer, probability, rule and threshold, slices used and
  refused, series and order, model version and the decision-support statement;
- a Secondary Capture: the most suspicious slice with its heat map, colour bar
  and the same statement burned in.

Both are new series of the received study (its patient and study identifiers are
copied into them, which PACS needs to file them); no patient field is ever
logged: log lines name a study by the hash of its files.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from covidscan import DISCLAIMER
from covidscan.errors import CovidscanError, ImageReadError
from covidscan.serve.predictor import Bundle, EnsembleBundle, load_bundle
from covidscan.serve.router import NoModelForModality, Router, bundle_name
from covidscan.serve.study_view import StudyAnalysis, analyse_routed_study

log = logging.getLogger("covidscan.dicom")

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR Storage
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
_PATIENT_AND_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
                      "StudyID", "AccessionNumber", "ReferringPhysicianName")
MAX_PENDING_INSTANCES = 4096  # across studies: a sender that never stops is cut off here


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


@dataclass
class _PendingStudy:
    files: list[tuple[str, bytes]] = field(default_factory=list)
    last: float = field(default_factory=time.monotonic)
    identifiers: object | None = None  # the patient and study module of one instance (for the answer only)


def _identifiers(ds: object) -> object:
    from pydicom.dataset import Dataset

    kept = Dataset()
    for keyword in _PATIENT_AND_STUDY:
        if keyword in ds:  # type: ignore[operator]
            setattr(kept, keyword, getattr(ds, keyword))
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


def answer_lines(analysis: StudyAnalysis, bundle: Bundle | EnsembleBundle) -> list[tuple[str, str]]:
    """The answer as (name, text) pairs: the SR's items and the Secondary Capture's burned-in text."""
    from covidscan.decision import rule_name

    study = bundle.study(analysis.results)
    if study.answered:
        answer = f"{study.label} (probability {study.probability:.3f})"
    elif study.used:
        answer = f"{study.label} with this model: {study.reason}"
    else:
        answer = "refused: no slice is like the model's training data"
    lines = [
        ("Decision support", DISCLAIMER),
        ("Study answer", answer),
        ("Study rule", f"{rule_name(bundle.study_rule)}, threshold {float(bundle.study_rule.get('threshold', 0.5)):.3f}; "  # type: ignore[arg-type]
                       f"{bundle.evidence_rule.describe()}"),
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


def send(datasets: list[object], destination: Destination, calling_ae: str) -> list[int]:
    """C-STORE each data set to the destination; returns the statuses (0 = success)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    for ds in datasets:
        ae.add_requested_context(str(ds.SOPClassUID), "1.2.840.10008.1.2.1")  # type: ignore[attr-defined]
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise CovidscanError(f"cannot reach {destination.ae_title} at {destination.host}:{destination.port} (association refused or failed)")
    try:
        statuses = []
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(getattr(status, "Status", 0xC000)) if status else 0xC000)
        return statuses
    finally:
        assoc.release()


class DicomListener:
    """Storage SCP + study completion + answer by C-STORE. `start()` returns at once; `stop()` ends it."""

    def __init__(self, bundle_dirs: str | list[str], destination: Destination, port: int = 11112, host: str = "0.0.0.0",
                 ae_title: str = "COVIDSCAN", idle_s: float = 10.0, max_slices: int = 1024) -> None:
        """Several bundles: one per modality; each study goes to the model of its Modality tag (serve/router.py)."""
        folders = [bundle_dirs] if isinstance(bundle_dirs, str) else list(bundle_dirs)
        self.router = Router([(bundle_name(folder), load_bundle(folder)) for folder in folders])
        self.destination, self.port, self.host, self.ae_title, self.idle_s, self.max_slices = destination, port, host, ae_title, idle_s, max_slices
        self.pending: dict[str, _PendingStudy] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.answered: list[str] = []  # study hashes answered, for callers and tests
        self.server: object | None = None
        self.worker: threading.Thread | None = None

    def _on_store(self, event: object) -> int:
        ds = event.dataset  # type: ignore[attr-defined]
        key = str(getattr(ds, "StudyInstanceUID", "") or "no-study-uid")
        data = event.encoded_dataset(include_meta=True)  # type: ignore[attr-defined]
        with self.lock:
            if sum(len(s.files) for s in self.pending.values()) >= MAX_PENDING_INSTANCES:
                log.warning("instance refused: %d instances already waiting", MAX_PENDING_INSTANCES)
                return 0xA700  # out of resources
            study = self.pending.setdefault(key, _PendingStudy())
            study.files.append((f"instance {len(study.files) + 1}", data))
            study.last = time.monotonic()
            if study.identifiers is None:
                study.identifiers = _identifiers(ds)
        return 0x0000

    def start(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt

        ae = AE(ae_title=self.ae_title)
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context("1.2.840.10008.1.1")  # verification (C-ECHO)
        self.server = ae.start_server((self.host, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = self.server.server_address[1]  # type: ignore[attr-defined]
        self.worker = threading.Thread(target=self._watch, daemon=True)
        self.worker.start()
        log.info("listening as %s on port %d; answers go to %s", self.ae_title, self.port, self.destination.ae_title)

    def stop(self) -> None:
        self.done.set()
        if self.server is not None:
            self.server.shutdown()  # type: ignore[attr-defined]
        if self.worker is not None:
            self.worker.join(10)

    def _watch(self) -> None:
        while not self.done.wait(0.2):
            now = time.monotonic()
            with self.lock:
                ready = [k for k, s in self.pending.items() if now - s.last >= self.idle_s]
                studies = [self.pending.pop(k) for k in ready]
            for study in studies:
                self._answer(study)

    def _answer(self, study: _PendingStudy) -> None:
        started = time.perf_counter()
        try:
            analysis, served, _ = analyse_routed_study(self.router, study.files, self.max_slices)
        except ImageReadError as exc:
            log.warning("study of %d instances not analysed: %s", len(study.files), exc.problem)
            return
        except NoModelForModality as exc:
            log.warning("study of %d instances not analysed: %s", len(study.files), exc)
            return
        lines = answer_lines(analysis, served.bundle)
        reply = [structured_report(lines, study.identifiers), secondary_capture(analysis, served.bundle, lines, study.identifiers)]
        try:
            statuses = send(reply, self.destination, self.ae_title)
        except CovidscanError as exc:
            log.error("study %s analysed, answer not delivered: %s", analysis.study_hash[:12], exc)
            return
        self.answered.append(analysis.study_hash)
        log.info("study %s: %d slices analysed in %.1f s, %d file(s) skipped; SR and heat map sent to %s (statuses %s)",
                 analysis.study_hash[:12], len(analysis.results), time.perf_counter() - started, len(analysis.skipped),
                 self.destination.ae_title, ",".join(f"0x{s:04X}" for s in statuses))

"""A whole CT study in the service: planned from headers, decoded one slice at a time, kept briefly for the viewer.

`analyse_study` turns the uploaded files (DICOM slices, zips of DICOM folders)
into one series in body order (`covidscan.data.study`), decodes each planned
file when its turn comes (one full-size slice in memory at a time), and runs
the bundle on all slices with a heat map for every slice. Files that cannot be
read and slices the input gate refuses are reported, never fatal.

What the viewer needs afterwards (display slices at `VIEW_SIZE` px, in HU for
CT DICOM so the page can switch window presets, and each slice's heat map) is
kept in memory under a random study ID for `VIEW_TTL_S`, bounded by bytes (`VIEW_MEMORY_BYTES`, the oldest
view forgotten first): about 60 MB for 300 CT slices (HU as int16 and the heat maps as uint8, 256 px), so the
default holds five such studies. Nothing is written to disk and no patient field is kept.
"""
from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from covidscan.data.intensity import LUNG_WINDOW
from covidscan.data.preprocess import prepare_with_box
from covidscan.data.study import StudyFiles, StudyPlan, ZipStudy, is_zip, iter_study_images, plan_files
from covidscan.errors import ImageReadError
from covidscan.explain.overlay import colorize, png_bytes
from covidscan.serve.predictor import Bundle, EnsembleBundle, SliceResult
from covidscan.serve.router import Router, ServedBundle

VIEW_SIZE = 256
VIEW_MEMORY_BYTES = 320_000_000  # all kept views together (`python -m covidscan.serve --view-memory-mb`): five 300-slice studies
VIEW_TTL_S = 1800.0
# CT window presets (low, high) in HU: lung = the model's own window (W1500/L-600), mediastinum (soft tissue)
# W400/L40, bone W1800/L400.
WINDOWS = {"lung": (LUNG_WINDOW[1] - LUNG_WINDOW[0] / 2, LUNG_WINDOW[1] + LUNG_WINDOW[0] / 2),
           "mediastinum": (-160.0, 240.0), "bone": (-500.0, 1300.0)}


@dataclass
class StudyView:
    """Display slices and heat maps of one analysed study, for GET .../studies/{id}/..."""

    hu: np.ndarray | None  # (n, S, S) int16 HU: CT DICOM (the gray image is its lung window)
    gray: np.ndarray | None  # (n, S, S) uint8: the slice as the model saw it, for inputs without HU
    heat: np.ndarray  # (n, S, S) uint8: the heat map placed where the model looked
    sources: list[str]
    created: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.hu, self.gray, self.heat) if a is not None)

    @property
    def windows(self) -> list[str]:
        return list(WINDOWS) if self.hu is not None else ["as sent"]

    def gray_slice(self, index: int, window: str = "lung") -> np.ndarray:
        """uint8 slice `index` (from 0): in the window preset for HU, as the model saw it otherwise (the lung window
        is the model's own CT window)."""
        if self.hu is None:
            return self.gray[index]  # type: ignore[index]
        low, high = WINDOWS.get(window, WINDOWS["lung"])
        scaled = (self.hu[index].astype(np.float32) - low) / (high - low)
        return np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8)

    def slice_png(self, number: int, window: str) -> bytes:
        return png_bytes(self.gray_slice(self._index(number), window), fast=True)

    def heat_png(self, number: int) -> bytes:
        heat = self.heat[self._index(number)]
        rgba = np.concatenate([colorize(heat.astype(np.float32) / 255.0), heat[..., None]], axis=2)
        return png_bytes(rgba, fast=True)

    def _index(self, number: int) -> int:
        if not 1 <= number <= len(self.heat):
            raise KeyError(f"slice {number} does not exist; the study has slices 1 to {len(self.heat)}")
        return number - 1


class StudyViews:
    """The analysed studies' views, by random ID, forgotten after `ttl_s` or, oldest first, when together they would
    hold more than `max_bytes` (thread-safe)."""

    def __init__(self, max_bytes: int = VIEW_MEMORY_BYTES, ttl_s: float = VIEW_TTL_S) -> None:
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self._views: OrderedDict[str, StudyView] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, view: StudyView) -> str:
        key = secrets.token_urlsafe(16)
        with self._lock:
            self._expire()
            self._views[key] = view
            held = sum(v.nbytes for v in self._views.values())
            while held > self.max_bytes and len(self._views) > 1:
                held -= self._views.popitem(last=False)[1].nbytes
        return key

    def get(self, key: str) -> StudyView | None:
        with self._lock:
            self._expire()
            return self._views.get(key)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, v in self._views.items() if now - v.created > self.ttl_s]:
            del self._views[key]


def release_memory() -> None:
    """Hand the heap that a large study freed back to the system (glibc keeps it otherwise, and RSS stays high after
    the request); a no-op where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _resize(values: np.ndarray, size: int) -> np.ndarray:
    image = Image.fromarray(np.asarray(values, np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None), np.float32)


def _place_heat(heat: np.ndarray, seen: tuple[float, float, float, float], size: int) -> np.ndarray:
    """The model-input heat map placed over the part of the full slice the model saw (a lung crop, or all of it)."""
    top, bottom, left, right = (int(round(f * size)) for f in seen)
    out = np.zeros((size, size), np.uint8)
    if bottom - top >= 1 and right - left >= 1:
        placed = Image.fromarray(np.asarray(heat, np.float32), mode="F").resize((right - left, bottom - top), Image.Resampling.BILINEAR)
        out[top:bottom, left:right] = np.clip(np.round(np.asarray(placed) * 255), 0, 255).astype(np.uint8)
    return out


def expand_uploads(named: Iterable[tuple[str, bytes]]) -> StudyFiles:
    """Zips of DICOM folders opened into their files (named 'upload:member', inflated one at a time when read); other
    files as they are. Only the zips' directories are read here (their counts and declared sizes checked)."""
    return StudyFiles.combined([ZipStudy(data, name).files(f"{name}:") if is_zip(data) else StudyFiles.in_memory([(name, data)])
                                for name, data in named])


@dataclass
class StudyAnalysis:
    plan: StudyPlan
    results: list[SliceResult]
    sources: list[str]  # per result: the file (and frame) it came from
    view: StudyView
    skipped: list[tuple[str, str]]  # the plan's, plus files that failed to decode
    study_hash: str  # SHA-256 over the analysed files' own hashes, in order: names the study without a patient field


def analyse_study(bundle: Bundle | EnsembleBundle, data: Mapping[str, bytes], max_slices: int, plan: StudyPlan | None = None) -> StudyAnalysis:
    """Plan (unless planned), decode in order, analyse (heat maps for every slice). Raises ImageReadError when no slice is usable."""
    plan = plan or plan_files(data.items())
    method = bundle.model_card.preprocess
    prepared, sources, hu, gray, seen_boxes = [], [], [], [], []
    skipped = list(plan.skipped)
    digest = hashlib.sha256()
    for header in plan.slices:
        digest.update(hashlib.sha256(data[header.source]).digest())
    for source, image in iter_study_images(plan, data, skipped, keep_hu=True):
        if len(prepared) >= max_slices:
            raise ImageReadError("study", f"more than {max_slices} slices in one request")
        model_input, seen = prepare_with_box(image.pixels, bundle.size, method)
        prepared.append(model_input)
        seen_boxes.append(seen)
        sources.append(source)
        gray.append(np.clip(np.round(_resize(image.pixels, VIEW_SIZE) * 255), 0, 255).astype(np.uint8))
        hu.append(np.clip(_resize(image.hu, VIEW_SIZE), -32768, 32767).astype(np.int16) if image.hu is not None else None)
    keep_hu = bool(hu) and all(h is not None for h in hu)
    if not prepared:
        raise ImageReadError("study", "no slice could be decoded: " + "; ".join(f"{s}: {r}" for s, r in skipped[:3]))
    results = bundle.analyse(prepared, heatmaps=True)
    heat = np.stack([_place_heat(r.heatmap, box, VIEW_SIZE) if r.heatmap is not None else np.zeros((VIEW_SIZE, VIEW_SIZE), np.uint8)
                     for r, box in zip(results, seen_boxes)])
    for r in results:
        r.heatmap = None  # the view holds them; the JSON answer links to them instead of inlining 300 maps
    view = StudyView(hu=np.stack(hu) if keep_hu else None, gray=None if keep_hu else np.stack(gray), heat=heat, sources=sources)  # type: ignore[arg-type]
    return StudyAnalysis(plan, results, sources, view, skipped, digest.hexdigest())


def analyse_routed_study(router: Router, named: Mapping[str, bytes], max_slices: int) -> tuple[StudyAnalysis, ServedBundle, str]:
    """Plan the series, pick the model by its Modality tag (or, unknown, by the gates: the closest answer), analyse
    every slice. Raises ImageReadError (no usable slice) or router.NoModelForModality."""
    plan = plan_files(named.items(), router.can_serve)
    modality = next((header.modality for header in plan.slices if header.modality), "")
    chosen, routed_by = router.candidates("dicom", modality, "the study")
    answers = [(served, analyse_study(served.bundle, named, max_slices, plan)) for served in chosen]
    served, analysis = answers[Router.closest([(served, analysis.results) for served, analysis in answers])]
    return analysis, served, routed_by

"""REST API and web page over an exported bundle (FastAPI + ONNX Runtime; torch is never imported).

Routes: GET / (the page), GET /api/v1/health, GET /api/v1/model, POST /api/v1/predict,
OpenAPI docs at /docs. Every error is JSON {error, detail} with a 4xx status;
uploads stay in memory and are never written under a user-given name; no DICOM
patient field is read into a response or a log line.
"""
from __future__ import annotations

import base64
import logging
import secrets
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from covidscan import DISCLAIMER
from covidscan.data.io import ImageReadError, read_image_bytes, sniff_kind
from covidscan.explain.overlay import colorize, png_bytes
from covidscan.serve.predictor import Bundle, SliceResult

log = logging.getLogger("covidscan.serve")

API = "/api/v1"
DEFAULT_MAX_UPLOAD_MB = 50.0
MAX_FILES = 64
HEATMAP_SLICES = 8  # per volume: heat maps for the most suspicious slices only
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"GIF8")


class ApiError(Exception):
    """An error answered as JSON {error, detail} with its status code."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


class ErrorBody(BaseModel):
    error: str = Field(description="Short error class, e.g. 'unsupported media type'.")
    detail: str = Field(description="What went wrong and what to do, naming the file.")


class SliceOut(BaseModel):
    index: int
    label: str
    probabilities: dict[str, float]
    in_distribution: bool = Field(description="False: the input gate found this slice unlike the training images.")
    gate_distance: float = Field(description="Distance from the training images (Mahalanobis); refused above the bundle's threshold.")
    image_png: str | None = Field(None, description="What the model saw (resized gray), PNG base64.")
    heatmap_png: str | None = Field(None, description="Class activation map, RGBA PNG base64 (alpha = heat), same size.")


class StudyOut(BaseModel):
    label: str
    probability: float = Field(description="Mean of the top-3 slice probabilities of the positive class (gated slices only).")
    slices_used: int
    slices_refused: int


class FileOut(BaseModel):
    file: str = Field(description="Upload position and the name as given (never used as a path).")
    kind: str
    slices: list[SliceOut]
    study: StudyOut | None = None


class PredictOut(BaseModel):
    decision_support: str
    model_version: str
    threshold: float
    positive_class: str
    results: list[FileOut]
    study: StudyOut | None = Field(None, description="All uploads as one study (study=true).")
    timing_ms: dict[str, float]


class BodyLimit:
    """413 before reading a body larger than the limit (by Content-Length, or while streaming)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, "payload too large", f"upload exceeds the limit of {self.max_bytes / 1e6:.0f} MB")
            return message

        try:
            await self.app(scope, counted, send)
        except ApiError as exc:
            if exc.status != 413:
                raise
            await self._too_large(send)

    async def _too_large(self, send: Send) -> None:
        response = JSONResponse({"error": "payload too large", "detail": f"upload exceeds the limit of {self.max_bytes / 1e6:.0f} MB"}, 413)
        await response({"type": "http"}, _never_receive, send)


async def _never_receive() -> Message:
    return {"type": "http.disconnect"}


def _b64png(array: np.ndarray) -> str:
    return base64.b64encode(png_bytes(array, fast=True)).decode("ascii")


def _heat_rgba(heat: np.ndarray) -> np.ndarray:
    rgb = colorize(heat)
    alpha = (np.clip(heat, 0, 1) * 255).round().astype(np.uint8)[..., None]
    return np.concatenate([rgb, alpha], axis=2)


def _study(results: list[SliceResult], classes: list[str], threshold: float) -> StudyOut:
    kept = [r.probabilities[classes[-1]] for r in results if r.in_distribution]
    top = sorted(kept, reverse=True)[:3]
    probability = float(np.mean(top)) if top else float("nan")
    label = (classes[-1] if probability >= threshold else classes[0]) if top else "refused"
    return StudyOut(label=label, probability=probability if top else 0.0, slices_used=len(kept), slices_refused=len(results) - len(kept))


def _decode(data: bytes, name: str) -> tuple[str, list[np.ndarray]]:
    """Uploaded bytes -> (kind, gray slices); 415 for unknown types, 422 for unreadable ones."""
    if not data:
        raise ApiError(422, "empty file", f"{name}: file is empty (0 bytes)")
    kind = sniff_kind(data)
    if kind == "raster" and not data.startswith(_MAGIC):
        raise ApiError(415, "unsupported media type", f"{name}: not a PNG, JPEG, BMP, TIFF, DICOM or NIfTI file")
    try:
        images = read_image_bytes(data, name)
    except ImageReadError as exc:
        raise ApiError(422, "unreadable image", str(exc)) from None
    return kind, [image.pixels for image in images]


def create_app(
    bundle_dir: str | Path,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    api_key: str | None = None,
    cors_origins: list[str] | None = None,
    threads: int = 0,
) -> FastAPI:
    """The service for one bundle. CORS stays off unless origins are given."""
    bundle = Bundle(bundle_dir, threads=threads)
    app = FastAPI(
        title="covidscan",
        version=bundle.version,
        description=f"COVID-19 on chest CT: probabilities and heat maps. {DISCLAIMER}",
    )
    app.state.bundle = bundle
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"], allow_headers=["X-API-Key"])
    app.add_middleware(BodyLimit, max_bytes=int(max_upload_mb * 1e6))
    # Starlette spools uploads above 1 MB to (randomly named) temporary files; the body limit above
    # bounds memory, so keep every upload in memory instead. Process-wide: one service per process.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, int(max_upload_mb * 1e6))
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 413, 415, 422)}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.error, "detail": exc.detail}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"error": "invalid request", "detail": where or "invalid request"}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": "http error", "detail": str(exc.detail)}, exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - a bug, logged without data
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": "internal error", "detail": "the server failed; the incident was logged"}, 500)

    def check_key(request: Request) -> None:
        if api_key and not secrets.compare_digest(request.headers.get("x-api-key", ""), api_key):
            raise ApiError(401, "unauthorised", "missing or wrong X-API-Key header")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((resources.files("covidscan.serve") / "static" / "index.html").read_text(encoding="utf-8"))

    @app.get(f"{API}/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "model_version": bundle.version}

    @app.get(f"{API}/model", responses=errors)
    def model(request: Request) -> dict[str, Any]:
        check_key(request)
        return bundle.describe()

    @app.post(f"{API}/predict", response_model=PredictOut, responses=errors)
    async def predict(
        request: Request,
        files: Annotated[list[UploadFile], File(description="PNG, JPEG, DICOM or NIfTI files; several DICOM files form a series with study=true.")],
        heatmap: Annotated[bool, Query(description="Return class activation maps.")] = True,
        study: Annotated[bool, Query(description="Treat all uploads as slices of one study and aggregate them.")] = False,
    ) -> PredictOut:
        check_key(request)
        started = time.perf_counter()
        if len(files) > MAX_FILES:
            raise ApiError(413, "too many files", f"{len(files)} files; at most {MAX_FILES} per request")
        decoded = []
        for position, upload in enumerate(files):
            name = f"#{position + 1} {(upload.filename or 'upload')[:120]}"
            decoded.append((name, *_decode(await upload.read(), name)))
        read_ms = (time.perf_counter() - started) * 1000
        out_files, all_results = [], []
        for name, kind, images in decoded:
            # In a worker thread (ONNX Runtime releases the GIL): health checks stay answered during a long volume.
            results = await run_in_threadpool(bundle.analyse, images, heatmap)
            all_results += results
            volume = len(results) > 1
            if not volume and not results[0].in_distribution:
                raise ApiError(422, "not a chest CT image", (
                    f"{name}: this image does not look like the chest CT slices the model was trained on "
                    f"(distance {results[0].gate_distance:.1f} > {bundle.gate_threshold:.1f}); no prediction is given"))
            shown = set(np.argsort([-r.probabilities[bundle.classes[-1]] for r in results])[:HEATMAP_SLICES].tolist())
            slices = [
                SliceOut(
                    index=i, label=r.label, probabilities=r.probabilities, in_distribution=r.in_distribution, gate_distance=r.gate_distance,
                    image_png=_b64png(r.image) if heatmap and r.image is not None and i in shown else None,
                    heatmap_png=_b64png(_heat_rgba(r.heatmap)) if heatmap and r.heatmap is not None and i in shown else None,
                )
                for i, r in enumerate(results)
            ]
            file_study = _study(results, bundle.classes, bundle.threshold) if volume else None
            if file_study is not None and file_study.slices_used == 0:
                raise ApiError(422, "not a chest CT image", f"{name}: none of its {len(results)} slices looks like a chest CT slice")
            out_files.append(FileOut(file=name, kind=kind, slices=slices, study=file_study))
        total_ms = (time.perf_counter() - started) * 1000
        log.info("predict: %d file(s), %d slice(s), %.1f ms", len(files), len(all_results), total_ms)
        return PredictOut(
            decision_support=DISCLAIMER, model_version=bundle.version, threshold=bundle.threshold,
            positive_class=bundle.classes[-1], results=out_files,
            study=_study(all_results, bundle.classes, bundle.threshold) if study and len(all_results) > 1 else None,
            timing_ms={"decode": round(read_ms, 2), "total": round(total_ms, 2)},
        )

    return app

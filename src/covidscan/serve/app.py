"""REST API and web page over exported bundles (FastAPI + ONNX Runtime; torch is never imported).

Several bundles (a CT model and a chest X-ray model) can be served at once; each upload is answered by one of them,
chosen by its DICOM Modality tag or, for plain images, by the bundles' input gates (serve/router.py), and every
answer names the model that gave it.

Routes: GET / (the page), GET /api/v1/health, GET /api/v1/model (the first bundle), GET /api/v1/models (all),
POST /api/v1/predict,
GET /api/v1/studies/{id}/slices/{n}.png and .../heatmaps/{n}.png (the viewer's images of a study
analysed in the last half hour), OpenAPI docs at /docs (Swagger UI served from the package, no CDN). Every error
is JSON {error, detail} with a 4xx status; uploads stay in memory and are never
written under a user-given name; no DICOM patient field is read into a response
or a log line.

Hostile input: the API key is checked before the body is read; bodies over the
limit get 413 (also when chunked); a body that stops arriving gets 408 after
`read_timeout_s`; decoding and inference run in worker threads, at most
`concurrency` uploads at a time (the event loop and /health stay free), and every
size a file declares is checked before memory is allocated (data/io.py,
data/nifti.py). One bad file in a multi-file request is reported beside the
other files' results.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from covidscan import DISCLAIMER
from covidscan.data.io import ImageData, ImageReadError, iter_image_bytes, quiet_pydicom, routing_modality, sniff_kind
from covidscan.serve import DEFAULT_MAX_UPLOAD_MB
from covidscan.explain.overlay import colorize, png_bytes
from covidscan.decision import rule_text
from covidscan.serve.audit import audit_analysis
from covidscan.serve.predictor import EnsembleBundle, Bundle, SliceResult
from covidscan.data.study import StudyFiles, is_zip
from covidscan.serve.router import BY_GATE, BY_STUDY, NoModelForModality, Router, ServedBundle, load_router, modality_name
from covidscan.serve.study_view import (VIEW_MEMORY_BYTES, StudyAnalysis, StudyView, StudyViews, analyse_routed_study, expand_uploads,
                                        release_memory)

log = logging.getLogger("covidscan.serve")

API = "/api/v1"
DEFAULT_CONCURRENCY = 2  # uploads decoded and analysed at once; memory bound = concurrency x per-request bound
DEFAULT_READ_TIMEOUT_S = 30.0  # a request body that stops arriving for this long is dropped (408)
MAX_FILES = 1000  # a chest CT series arrives as one file per slice (Starlette parses at most 1000; more: send a zip)
MAX_SLICES_PER_REQUEST = 1024
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
    index: int = Field(description="Position in the file (volumes) or in the study, from 0.")
    number: int | None = Field(None, description="Studies: the slice number shown to readers, from 1, in body order (head first).")
    source: str | None = Field(None, description="Studies: the file (and frame) the slice came from.")
    label: str
    probabilities: dict[str, float]
    in_distribution: bool = Field(description="False: the input gate found this slice unlike the training images.")
    gate_distance: float = Field(description="Distance from the training images (Mahalanobis); refused above the bundle's threshold.")
    image_png: str | None = Field(None, description="What the model saw (resized gray), PNG base64.")
    heatmap_png: str | None = Field(None, description="Class activation map, RGBA PNG base64 (alpha = heat), same size.")
    member_probabilities: dict[str, float] | None = Field(None, description="Ensembles: each member network's probability of the positive class.")


class ModelRef(BaseModel):
    name: str = Field(description="The served model that answered (its bundle folder's name).")
    modality: str = Field(description="What it was trained on: CT, CXR (chest X-ray) or '' (not recorded).")
    version: str
    classes: list[str]
    positive_class: str
    threshold: float
    routed_by: str = Field(description="Why this model answered: the only model served, the DICOM Modality tag, a NIfTI volume (CT), "
                                       "the input gates (the model whose gate accepted the image, closest to its training images), "
                                       "or the study's first file.")


class StudyOut(BaseModel):
    label: str = Field(description="A class, 'refused' (no slice accepted by the input gate) or 'not evaluable' (too little evidence: "
                                   "see `reason`).")
    probability: float | None = Field(description="Study probability of the positive class by the model card's rule (accepted slices "
                                                  "only); null when the study is refused or not evaluable.")
    slices_used: int
    slices_refused: int
    slices_with_lung: int = Field(0, description="Slices in which a lung region was found (the evidence rule's lung check).")
    reason: str = Field("", description="Why the study is refused or not evaluable with this model, with the counts.")
    evidence_rule: str = Field("", description="When the model answers a study at all (the model card's evidence rule, fitted on validation patients).")
    validated: str = Field("", description="Where the model was validated and how it performed (the model card's validation statement).")
    rule: str = Field(description="How slice probabilities became the study's, e.g. 'mean of the slices' (chosen on validation patients).")
    threshold: float = Field(description="Study threshold, chosen on validation patients.")
    order: str | None = Field(None, description="DICOM studies: how slices were ordered (position, instance number, as received).")
    series: str | None = Field(None, description="DICOM studies: which series was analysed and why.")
    skipped: list[ErrorBody] = Field(default_factory=list, description="Files left out (scouts, other series, unreadable), with the reason.")
    study_hash: str | None = Field(None, description="DICOM studies: SHA-256 over the analysed files' hashes (identifies the study, no patient field).")


class ViewerOut(BaseModel):
    study_id: str = Field(description="Random ID of the analysed study; its images stay available for half an hour.")
    slices: int
    windows: list[str] = Field(description="Window presets the slice images can be fetched in (CT DICOM: lung, mediastinum, bone).")
    slice_url: str = Field(description="Template of a slice image URL ({n} from 1; ?window=...).")
    heatmap_url: str = Field(description="Template of a slice's heat map URL (RGBA PNG, alpha = heat).")


class FileOut(BaseModel):
    file: str = Field(description="Upload position and the name as given (never used as a path).")
    kind: str
    model: ModelRef | None = Field(None, description="The model that answered this file.")
    slices: list[SliceOut]
    study: StudyOut | None = None
    error: ErrorBody | None = Field(None, description="Why this file gave no result (the other files' results stand).")


class PredictOut(BaseModel):
    decision_support: str
    model: str = Field(description="Name of the model that answered the first file (each file names its own: results[].model).")
    model_version: str
    threshold: float
    positive_class: str
    results: list[FileOut]
    study: StudyOut | None = Field(None, description="All uploads as one study (study=true).")
    viewer: ViewerOut | None = Field(None, description="DICOM studies: where the viewer fetches each slice and heat map.")
    timing_ms: dict[str, float]


class Guard:
    """ASGI middleware in front of the app: API key before the body, body size limit, body read timeout.

    The key is compared as bytes in constant time before a byte of the body is
    read. A body over the limit is answered 413 whether it declared its length
    or arrived chunked (the app's own answer to the cut-off body is dropped).
    A body that stops arriving for `read_timeout_s` is answered 408.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, api_key: str | None, read_timeout_s: float) -> None:
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s
        self.api_key = api_key.encode("utf-8") if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        path = str(scope.get("path", ""))
        if self.api_key and path.startswith(API) and path != f"{API}/health":
            if not secrets.compare_digest(headers.get(b"x-api-key", b""), self.api_key):
                await _answer(send, 401, "unauthorised", "missing or wrong X-API-Key header")
                return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _answer(send, 413, "payload too large", f"upload exceeds the limit of {self.max_bytes / 1e6:.0f} MB")
            return
        seen, refused, started = 0, [""], [False]

        async def guarded_receive() -> Message:
            nonlocal seen
            if refused[0]:
                return {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except asyncio.TimeoutError:
                refused[0] = "timeout"
                return {"type": "http.disconnect"}
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                refused[0] = "size"
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if refused[0]:
                return  # the app's answer to a cut-off body is replaced below
            started[0] = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not refused[0]:
                raise
        if refused[0] and not started[0]:
            if refused[0] == "size":
                await _answer(send, 413, "payload too large", f"upload exceeds the limit of {self.max_bytes / 1e6:.0f} MB")
            else:
                await _answer(send, 408, "request timeout", f"the request body stopped arriving for {self.read_timeout_s:.0f} s")


async def _answer(send: Send, status: int, error: str, detail: str) -> None:
    response = JSONResponse({"error": error, "detail": detail}, status, headers={"Connection": "close"})
    await response({"type": "http"}, _never_receive, send)


async def _never_receive() -> Message:
    return {"type": "http.disconnect"}


def _b64png(array: np.ndarray) -> str:
    return base64.b64encode(png_bytes(array, fast=True)).decode("ascii")


def _heat_rgba(heat: np.ndarray) -> np.ndarray:
    rgb = colorize(heat)
    alpha = (np.clip(heat, 0, 1) * 255).round().astype(np.uint8)[..., None]
    return np.concatenate([rgb, alpha], axis=2)


def _model_ref(served: ServedBundle, routed_by: str) -> ModelRef:
    bundle = served.bundle
    return ModelRef(name=served.name, modality=served.modality, version=bundle.version, classes=bundle.classes,
                    positive_class=bundle.classes[-1], threshold=bundle.threshold, routed_by=routed_by)


def _study(results: list[SliceResult], bundle: Bundle | EnsembleBundle) -> StudyOut:
    """The model card's study rule (chosen on validation patients, the one the report evaluates)."""
    from covidscan.decision import rule_name

    answer = bundle.study(results)
    return StudyOut(label=answer.label, probability=answer.probability if answer.answered else None, slices_used=answer.used,
                    slices_refused=answer.refused, slices_with_lung=answer.lung_slices, reason=answer.reason,
                    evidence_rule=bundle.evidence_rule.describe(), validated=bundle.validated,
                    rule=rule_name(bundle.study_rule), threshold=float(bundle.study_rule.get("threshold", 0.5)))  # type: ignore[arg-type]


def _images(data: bytes, name: str) -> tuple[str, Iterator[ImageData]]:
    """Uploaded bytes -> (kind, lazily decoded slices with what the file says of itself); 415 for unknown types."""
    if not data:
        raise ApiError(422, "empty file", f"{name}: file is empty (0 bytes)")
    kind = sniff_kind(data)
    if kind == "raster" and not data.startswith(_MAGIC):
        raise ApiError(415, "unsupported media type", f"{name}: not a PNG, JPEG, BMP, TIFF, DICOM or NIfTI file")
    return kind, iter_image_bytes(data, name)


def _content_key(named: list[tuple[str, bytes]]) -> str:
    """What an audit line names an upload by: a hash of the files' content (no name, no patient field)."""
    digest = hashlib.sha256()
    for _, data in named:
        digest.update(hashlib.sha256(data).digest())
    return f"ch-{digest.hexdigest()[:16]}"


def _gate_refusal(name: str, distance: float, served: ServedBundle, routed_by: str) -> ApiError:
    what = "any served model's training images; the closest was " if routed_by == BY_GATE else ""
    return ApiError(422, "unlike the training data", (
        f"{name}: this image is unlike {what}the {served.images_noun()} the model {served.name} was trained on "
        f"(distance {distance:.1f} > {served.bundle.gate_threshold:.1f}); no prediction is given"))


def _swagger_assets() -> Path | None:
    """Swagger UI's files from the swagger-ui-py package, so /docs works offline (no CDN)."""
    try:
        import swagger_ui
    except ImportError:
        return None
    folder = Path(swagger_ui.__file__).parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def create_app(
    bundle_dirs: str | Path | list[str] | list[Path],
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    api_key: str | None = None,
    cors_origins: list[str] | None = None,
    threads: int = 0,
    concurrency: int = DEFAULT_CONCURRENCY,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    view_memory_mb: float = VIEW_MEMORY_BYTES / 1e6,
) -> FastAPI:
    """The service for one bundle or several (one per modality; serve/router.py). CORS stays off unless origins are given."""
    folders = [bundle_dirs] if isinstance(bundle_dirs, (str, Path)) else list(bundle_dirs)
    quiet_pydicom()
    router = load_router(folders, threads=threads)
    for served in router.served:
        served.bundle.warm_up()
    bundle = router.default.bundle
    modalities = " and ".join(dict.fromkeys(modality_name(s.modality) for s in router.served if s.modality)) or "chest images"
    app = FastAPI(
        title="covidscan",
        version=bundle.version,
        description=f"COVID-19 on {modalities}: probabilities and heat maps. {DISCLAIMER}",
        docs_url=None,
        redoc_url=None,
    )
    busy = threading.BoundedSemaphore(max(1, concurrency))  # a thread lock: works whatever event loop calls us
    app.state.bundle, app.state.router = bundle, router
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"], allow_headers=["X-API-Key"])
    app.add_middleware(Guard, max_bytes=int(max_upload_mb * 1e6), api_key=api_key, read_timeout_s=read_timeout_s)
    # Starlette spools uploads above 1 MB to (randomly named) temporary files; the body limit above
    # bounds memory, so keep every upload in memory instead. Process-wide: one service per process.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, int(max_upload_mb * 1e6))
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 413, 415, 422)}
    views = StudyViews(max_bytes=int(view_memory_mb * 1e6))

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

    swagger = _swagger_assets()

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        if swagger is None:
            return HTMLResponse("<p>API docs need the swagger-ui-py package; the schema is at <a href='/openapi.json'>/openapi.json</a>.</p>")
        return get_swagger_ui_html(openapi_url="/openapi.json", title="covidscan API", swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css", swagger_favicon_url="/docs-assets/favicon-32x32.png")

    @app.get("/docs-assets/{name}", include_in_schema=False)
    def docs_asset(name: str) -> FileResponse:
        if swagger is None or name not in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"):
            raise ApiError(404, "not found", f"no documentation asset {name!r}")
        return FileResponse(swagger / name)

    def candidates(kind: str, modality: str, name: str) -> tuple[list[ServedBundle], str]:
        try:
            return router.candidates(kind, modality, name)
        except NoModelForModality as exc:
            raise ApiError(422, "no model for this modality", str(exc)) from None

    def analyse_file(files: StudyFiles, name: str, heatmap: bool, budget: int,
                     study_model: ServedBundle | None) -> tuple[str, list[SliceResult], ServedBundle, str]:
        """Decode, choose the model (router; by the first slice's own Modality), resize as each slice arrives, analyse.
        In a worker thread. One candidate: one full-size slice in memory at a time; several: the file's slices are
        kept as decoded and each candidate analyses them (plain images only, where the gates decide)."""
        with busy:
            try:
                _images(files.head(name), name)  # an unsupported type is refused from its first bytes, before the rest is read
                data = files[name]
            except ImageReadError as exc:
                raise ApiError(422, "unreadable zip", str(exc)) from None
            kind, images = _images(data, name)
            chosen: list[ServedBundle] = []
            routed_by = BY_STUDY
            decoded: list[np.ndarray] = []
            try:
                for image in images:
                    if not chosen:
                        chosen, routed_by = ([study_model], BY_STUDY) if study_model else candidates(
                            kind, routing_modality(image.meta.get("modality")), name)
                    if len(decoded) >= budget:
                        raise ApiError(413, "too many slices", f"{name}: more than {MAX_SLICES_PER_REQUEST} slices in one request")
                    decoded.append(chosen[0].bundle.prepare(image.pixels) if len(chosen) == 1 else image.pixels)
            except ImageReadError as exc:
                raise ApiError(422, "unreadable image", str(exc)) from None
            if not chosen:
                raise ApiError(422, "unreadable image", f"{name}: the file holds no image")
            answers = [(served, served.bundle.analyse(decoded, heatmap, heatmap_top=HEATMAP_SLICES)) for served in chosen]
            served, results = answers[Router.closest(answers)]
            return kind, results, served, routed_by

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((resources.files("covidscan.serve") / "static" / "index.html").read_text(encoding="utf-8"))

    @app.get(f"{API}/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model_version": bundle.version, "models": {s.name: s.bundle.version for s in router.served}}

    @app.get(f"{API}/model", responses=errors)
    def model(request: Request) -> dict[str, Any]:
        """The first served model's card (the only one, usually)."""
        return router.default.describe()

    @app.get(f"{API}/models", responses=errors)
    def models(request: Request) -> list[dict[str, Any]]:
        """Every served model's card, with its name and the modality uploads are routed to it by."""
        return [served.describe() for served in router.served]

    @app.post(f"{API}/predict", response_model=PredictOut, responses=errors)
    async def predict(
        request: Request,
        files: Annotated[list[UploadFile], File(description="PNG, JPEG, DICOM or NIfTI files, or zips of DICOM folders; "
                                                            "DICOM files with study=true (or a zip) form one series.")],
        heatmap: Annotated[bool, Query(description="Return class activation maps.")] = True,
        study: Annotated[bool, Query(description="Treat all uploads as slices of one study and aggregate them.")] = False,
    ) -> PredictOut:
        started = time.perf_counter()
        if len(files) > MAX_FILES:
            raise ApiError(413, "too many files", f"{len(files)} files; at most {MAX_FILES} per request")
        named = []
        for position, upload in enumerate(files):
            named.append((f"#{position + 1} {(upload.filename or 'upload')[:120]}", await upload.read()))
            await upload.close()  # frees the in-memory spool: the bytes are now held once
        if study or any(is_zip(data) for _, data in named):
            contents, analysis = await run_in_threadpool(analyse_dicom_study, named)
            if analysis is not None:
                del named, contents
                answer = _study_answer(analysis, started)
                del analysis
                release_memory()  # a study's transient arrays are freed: return the heap (RSS stays near its start)
                return answer
        else:
            contents = StudyFiles.in_memory(named)
        content_key = await run_in_threadpool(_content_key, named)  # hashing 300 MB would stall the event loop
        del named  # from here each file (zip member) is read when its turn comes: one in memory at a time
        out_files: list[FileOut] = []
        all_results: list[SliceResult] = []
        failures: list[ApiError] = []
        lead: ServedBundle | None = None  # the model of the first answered file (a study's every file goes to it)
        for name in contents:
            try:
                kind, results, served, routed_by = await run_in_threadpool(
                    analyse_file, contents, name, heatmap, MAX_SLICES_PER_REQUEST - len(all_results), lead if study else None)
                out_files.append(_file_out(name, kind, results, heatmap, served, routed_by, in_study=study))
                lead = lead or served
                all_results += results
            except ApiError as exc:
                failures.append(exc)
                out_files.append(FileOut(file=name, kind="", slices=[], error=ErrorBody(error=exc.error, detail=exc.detail)))
        del contents
        if failures and len(failures) == len(out_files):  # nothing to show (every file, or zip member): answer with the error itself
            statuses = {f.status for f in failures}
            status = statuses.pop() if len(statuses) == 1 else 422
            raise ApiError(status, failures[0].error if len(failures) == 1 else "no usable file",
                           " | ".join(f.detail for f in failures)[:2000])
        total_ms = (time.perf_counter() - started) * 1000
        log.info("predict: %d file(s), %d slice(s), %d refused file(s), %.1f ms", len(files), len(all_results), len(failures), total_ms)
        lead = lead or router.default
        summary = _study(all_results, lead.bundle) if study and len(all_results) > 1 else None
        labels = [r.label for r in all_results if r.in_distribution]
        answer = summary.label if summary else ", ".join(f"{labels.count(label)} {label}" for label in dict.fromkeys(labels)) or "refused"
        audit_analysis("service", content_key, lead.name, lead.bundle.version, answer, summary.probability if summary else None,
                       f"study rule {rule_text(lead.bundle.study_rule)}" if summary else f"slice threshold {lead.bundle.threshold:.3f}",
                       len(all_results), sum(not r.in_distribution for r in all_results), total_ms / 1000)
        return PredictOut(
            decision_support=DISCLAIMER, model=lead.name, model_version=lead.bundle.version, threshold=lead.bundle.threshold,
            positive_class=lead.bundle.classes[-1], results=out_files, study=summary, timing_ms={"total": round(total_ms, 2)},
        )

    def analyse_dicom_study(named: list[tuple[str, bytes]]) -> tuple[StudyFiles, tuple[StudyAnalysis, ServedBundle, str] | None]:
        """Zips opened (their members inflated one at a time, only when read) and, when any file is DICOM, the study
        analysed; all inside the concurrency limit. In a worker thread."""
        with busy:
            try:
                files = expand_uploads(named)
            except ImageReadError as exc:
                raise ApiError(422, "unreadable zip", str(exc)) from None
            try:
                if not any(sniff_kind(files.head(name)) == "dicom" for name in files):
                    return files, None
                return files, analyse_routed_study(router, files, MAX_SLICES_PER_REQUEST)
            except ImageReadError as exc:
                raise ApiError(422, "no usable slice", str(exc)) from None
            except NoModelForModality as exc:
                raise ApiError(422, "no model for this modality", str(exc)) from None

    def _study_answer(answer: tuple[StudyAnalysis, ServedBundle, str], started: float) -> PredictOut:
        """One series: every slice in body order (numbers from 1), the study answer, and the viewer's links."""
        analysis, served, routed_by = answer
        results = analysis.results
        slices = [SliceOut(index=i, number=i + 1, source=source, label=r.label, probabilities=r.probabilities, in_distribution=r.in_distribution,
                           gate_distance=r.gate_distance, member_probabilities=r.members)
                  for i, (r, source) in enumerate(zip(results, analysis.sources))]
        summary = _study(results, served.bundle)
        summary.order, summary.series, summary.study_hash = analysis.plan.order, analysis.plan.series_rule, analysis.study_hash
        summary.skipped = [ErrorBody(error=source, detail=reason) for source, reason in analysis.skipped]
        study_id = views.add(analysis.view)
        viewer = ViewerOut(study_id=study_id, slices=len(results), windows=analysis.view.windows,
                           slice_url=f"{API}/studies/{study_id}/slices/{{n}}.png", heatmap_url=f"{API}/studies/{study_id}/heatmaps/{{n}}.png")
        total_ms = (time.perf_counter() - started) * 1000
        log.info("predict: DICOM study, %d slice(s) analysed, %d file(s) skipped, %.1f ms", len(results), len(analysis.skipped), total_ms)
        model = served.bundle
        audit_analysis("service", f"ch-{analysis.study_hash[:16]}", served.name, model.version, summary.label, summary.probability,
                       f"study rule {rule_text(model.study_rule)}", len(results), summary.slices_refused, total_ms / 1000)
        return PredictOut(
            decision_support=DISCLAIMER, model=served.name, model_version=model.version, threshold=model.threshold, positive_class=model.classes[-1],
            results=[FileOut(file=f"DICOM series ({analysis.plan.describe()})", kind="dicom-series", model=_model_ref(served, routed_by),
                             slices=slices, study=summary)],
            study=summary, viewer=viewer, timing_ms={"total": round(total_ms, 2)},
        )

    def _view(study_id: str) -> StudyView:
        view = views.get(study_id)
        if view is None:
            raise ApiError(404, "study not found", f"no study {study_id[:40]!r}: its images are kept for half an hour after the analysis")
        return view

    @app.get(f"{API}/studies/{{study_id}}/slices/{{number}}.png", responses={404: {"model": ErrorBody}},
             response_class=Response, summary="One slice of an analysed study, as PNG, in a window preset")
    def study_slice(study_id: str, number: int, window: Annotated[str, Query(description="lung, mediastinum or bone (CT DICOM)")] = "lung") -> Response:
        try:
            return Response(_view(study_id).slice_png(number, window), media_type="image/png", headers={"Cache-Control": "no-store"})
        except KeyError as exc:
            raise ApiError(404, "slice not found", str(exc.args[0])) from None

    @app.get(f"{API}/studies/{{study_id}}/heatmaps/{{number}}.png", responses={404: {"model": ErrorBody}},
             response_class=Response, summary="The heat map of one slice of an analysed study (RGBA PNG, alpha = heat)")
    def study_heatmap(study_id: str, number: int) -> Response:
        try:
            return Response(_view(study_id).heat_png(number), media_type="image/png", headers={"Cache-Control": "no-store"})
        except KeyError as exc:
            raise ApiError(404, "slice not found", str(exc.args[0])) from None

    def _file_out(name: str, kind: str, results: list[SliceResult], heatmap: bool, served: ServedBundle, routed_by: str,
                  in_study: bool = False) -> FileOut:
        """One file's slices; a refused single image is an error unless it is one slice of a study (then it is marked)."""
        volume = len(results) > 1
        if not volume and not in_study and not results[0].in_distribution:
            raise _gate_refusal(name, results[0].gate_distance, served, routed_by)
        shown = {i for i, r in enumerate(results) if r.heatmap is not None}  # the most suspicious slices (Bundle.analyse)
        slices = [
            SliceOut(
                index=i, label=r.label, probabilities=r.probabilities, in_distribution=r.in_distribution, gate_distance=r.gate_distance,
                image_png=_b64png(r.image) if heatmap and r.image is not None and i in shown else None,
                heatmap_png=_b64png(_heat_rgba(r.heatmap)) if heatmap and r.heatmap is not None and i in shown else None,
                member_probabilities=r.members,
            )
            for i, r in enumerate(results)
        ]
        file_study = _study(results, served.bundle) if volume else None
        if file_study is not None and file_study.slices_used == 0:
            raise ApiError(422, "unlike the training data",
                           f"{name}: none of its {len(results)} slices is like the {served.images_noun()} the model {served.name} was trained on")
        return FileOut(file=name, kind=kind, model=_model_ref(served, routed_by), slices=slices, study=file_study)

    return app

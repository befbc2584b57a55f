"""The hostile corpus (tests/hostile_corpus.py, 174 cases) against the service: never a 5xx, every error JSON.

Plus what needs a live server: /health stays answered while a heavy upload is
decoded, a stalled body is dropped with 408, a chunked body over the limit
gets 413, and memory bombs are refused before they cost memory.
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import hostile_corpus as corpus

PART_HEADER = b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'

CASES = list(corpus.cases("ci"))


@pytest.fixture(scope="module")
def clients(tiny_bundle: Path) -> dict[bool, TestClient]:
    from covidscan.serve.app import create_app

    return {False: TestClient(create_app(tiny_bundle)), True: TestClient(create_app(tiny_bundle, api_key="s3cret"))}


def test_the_corpus_is_large_and_varied() -> None:
    assert len(CASES) >= 140
    assert len({c.name for c in CASES}) == len(CASES)
    kinds = " ".join(c.name for c in CASES)
    for word in ("nifti", "dicom", "png", "jpeg", "gzip", "locked", "filename"):
        assert kinds.count(word) >= 3, word


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_case_is_answered_without_a_server_error(clients: dict[bool, TestClient], case: corpus.Case) -> None:
    path, headers, body = corpus.encoded_request(case)
    encoded = {k: v.encode("utf-8") for k, v in headers.items()}
    response = clients[case.locked].post(path, headers=encoded, content=body)  # type: ignore[arg-type]
    assert response.status_code < 500, response.text[:500]
    assert response.status_code in case.expect, f"{response.status_code}: {response.text[:300]}"
    payload = response.json()
    if response.status_code >= 400:
        assert set(payload) == {"error", "detail"} and payload["detail"], payload
    else:
        assert "not a diagnosis" in payload["decision_support"]
        assert "MRN-12345678" not in response.text and "Hostile" not in response.text


def test_one_bad_file_does_not_sink_the_others(clients: dict[bool, TestClient], tiny_run: Path) -> None:
    import pandas as pd

    frame = pd.read_csv(tiny_run / "manifest.csv", keep_default_na=False)
    good = Path(frame.loc[frame["split"] == "train", "path"].iloc[0]).read_bytes()
    files = [("files", ("bad.txt", b"not an image", "text/plain")), ("files", ("good.png", good, "image/png"))]
    response = clients[False].post("/api/v1/predict", files=files)
    assert response.status_code == 200, response.text
    first, second = response.json()["results"]
    assert first["error"]["error"] == "unsupported media type" and "#1 bad.txt" in first["error"]["detail"] and first["slices"] == []
    assert second["error"] is None and len(second["slices"]) == 1


def test_api_key_is_checked_before_the_body_is_read(tiny_bundle: Path) -> None:
    from covidscan.serve.app import create_app

    consumed = []
    app = create_app(tiny_bundle, api_key="s3cret")

    async def counting_app(scope, receive, send):  # type: ignore[no-untyped-def]
        async def spy():  # type: ignore[no-untyped-def]
            consumed.append(1)
            return await receive()

        await app(scope, spy, send)

    client = TestClient(counting_app)
    response = client.post("/api/v1/predict", headers={"X-API-Key": "clé".encode("utf-8")}, files=[("files", ("x.png", b"x" * 1000, "image/png"))])  # type: ignore[dict-item]
    assert response.status_code == 401 and response.json()["error"] == "unauthorised"
    assert consumed == []


def test_nifti_declaring_gigabytes_costs_no_memory(clients: dict[bool, TestClient]) -> None:
    """Before: a 356-byte NIfTI declaring 4 GB grew the process by 4.1 GB. Now it is refused from its header."""
    import resource

    case = next(c for c in CASES if c.name == "nifti declares 4 GB")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    path, headers, body = corpus.encoded_request(case)
    response = clients[False].post(path, headers=headers, content=body)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert response.status_code == 422 and "limit" in response.json()["detail"]
    assert grown_mb < 200, f"peak RSS grew by {grown_mb:.0f} MB"


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    import numpy as np

    from covidscan.data.io import read_image

    path = tmp_path / "rotated.jpg"
    path.write_bytes(corpus.exif_rotated_jpeg())
    pixels = read_image(path).pixels
    expected = corpus.chest(64).astype(np.float32) / 255
    assert pixels.shape == (64, 64)
    assert np.abs(pixels - expected).mean() < np.abs(pixels - np.rot90(expected, 1)).mean() / 3


def test_preamble_less_dicom_is_read_as_dicom() -> None:
    from covidscan.data.io import iter_image_bytes, sniff_kind

    data = corpus.dicom(preamble=False)
    assert sniff_kind(data) == "dicom"
    with_preamble = next(iter_image_bytes(corpus.dicom()))
    without = next(iter_image_bytes(data))
    assert (with_preamble.pixels == without.pixels).all() and without.meta["format"] == "DICOM"


# ---------------------------------------------------------------------------- live server
@pytest.fixture(scope="module")
def live(tiny_bundle: Path) -> Iterator[int]:
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "covidscan.serve", str(tiny_bundle), "--port", str(port), "--read-timeout", "2",
                               "--max-upload-mb", "16"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if _get(port, "/api/v1/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
    yield port
    server.kill()
    server.wait()


def _get(port: int, path: str) -> tuple[int, float]:
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        status = connection.getresponse().status
    finally:
        connection.close()
    return status, time.perf_counter() - started


def test_health_answers_within_a_second_while_a_heavy_upload_is_decoded(live: int, tiny_run: Path) -> None:
    import numpy as np
    import pandas as pd
    from PIL import Image

    frame = pd.read_csv(tiny_run / "manifest.csv", keep_default_na=False)
    grays = [np.asarray(Image.open(p).convert("L").resize((192, 192))) for p in frame["path"][:8]]
    hu = [np.rot90(np.fliplr(-1350.0 + g.astype(np.float32) / 255.0 * 1500.0), -1) for g in grays]  # read back as g
    volume = corpus.nifti(np.stack([hu[i % len(hu)] for i in range(400)], axis=2).astype(np.int16), gz=True)  # 400 slices to decode
    assert len(volume) < 15_000_000
    case = corpus.Case("heavy", [("v.nii.gz", volume, corpus.GZIP)], (200, 422))
    path, headers, body = corpus.encoded_request(case)
    result: dict[str, object] = {}

    def upload() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", live, timeout=120)
        started = time.perf_counter()
        connection.request("POST", path + "?heatmap=false", body=body, headers=headers)
        response = connection.getresponse()
        result.update(status=response.status, seconds=time.perf_counter() - started, body=response.read())

    thread = threading.Thread(target=upload)
    thread.start()
    latencies = []
    while thread.is_alive():
        status, seconds = _get(live, "/api/v1/health")
        assert status == 200
        latencies.append(seconds)
        time.sleep(0.05)
    thread.join()
    assert result.get("status") == 200, result
    assert len(json.loads(result["body"])["results"][0]["slices"]) == 400  # type: ignore[arg-type]
    assert len(latencies) >= 3 and max(latencies) < 1.0, (result["seconds"], max(latencies))


def _read_answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (its error answers say Connection: close)."""
    parts = []
    try:
        while True:
            part = sock.recv(65536)
            if not part:
                break
            parts.append(part)
    except OSError:
        pass
    sock.close()
    return b"".join(parts)


def test_stalled_body_gets_408_and_chunked_body_over_the_limit_gets_413(live: int) -> None:
    sock = socket.create_connection(("127.0.0.1", live), timeout=15)
    sock.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 100000\r\n\r\n--b\r\nConte")
    started = time.perf_counter()
    answer = _read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b"request timeout" in answer, answer[:200]
    assert time.perf_counter() - started < 10
    sock = socket.create_connection(("127.0.0.1", live), timeout=30)
    sock.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    sock.sendall(b"%x\r\n%s\r\n" % (len(PART_HEADER), PART_HEADER))
    chunk = b"x" * (1 << 20)
    try:
        for _ in range(20):  # 20 MB against the 16 MB limit
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server may close as soon as it has answered
    answer = _read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 413") and b"payload too large" in answer, answer[:200]


def test_a_volume_is_read_once_for_all_its_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Indexing lists every slice of a volume as a row; reading them must not re-read the volume per slice."""
    import numpy as np

    from covidscan.data import io as cio
    from covidscan.data import nifti

    path = tmp_path / "v.nii"
    path.write_bytes(corpus.nifti(corpus.ct_volume((32, 32, 12))))
    reads = []
    original = nifti.volume_from_file
    monkeypatch.setattr(nifti, "volume_from_file", lambda p: reads.append(p) or original(p))
    cio._cached_volume.cache_clear()
    slices = [cio.read_image(path, i).pixels for i in range(12)]
    assert len(reads) == 1 and len(slices) == 12 and all(np.isfinite(s).all() for s in slices)


def test_the_stated_number_of_connections_is_served_and_one_more_is_refused(live: int) -> None:
    """--max-connections 16 (default) means 16 clients are served; uvicorn's own limit refuses at N, not N + 1."""
    connections = [http.client.HTTPConnection("127.0.0.1", live, timeout=30) for _ in range(16)]
    try:
        for connection in connections:
            connection.connect()
        statuses = []
        for connection in connections:  # all 16 open at once, keep-alive
            connection.request("GET", "/api/v1/health")
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        assert statuses == [200] * 16
        extra = http.client.HTTPConnection("127.0.0.1", live, timeout=30)
        extra.request("GET", "/api/v1/health")
        assert extra.getresponse().status == 503
        extra.close()
    finally:
        for connection in connections:
            connection.close()

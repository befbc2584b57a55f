#!/usr/bin/env bash
# Prove the Docker recipe without a Docker engine: build the wheel, run the image's own install
# script into a fresh venv, start the service as the image would, and check it over HTTP
# (health check command, a prediction, a refused upload). Exit 0 only if everything holds.
# Usage: docker/verify_recipe.sh [BUNDLE]   (default runs/demo/bundle; run `make demo` first)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bundle="${1:-$root/runs/demo/bundle}"
work="$(mktemp -d)"
cleanup() { for pid in ${server:-} ${node:-}; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
[ -f "$bundle/model.onnx" ] || { echo "verify: no bundle at $bundle (run make demo)" >&2; exit 1; }
started=$(date +%s)
# build stage
python3 -m venv "$work/buildenv"
"$work/buildenv/bin/pip" install -q --disable-pip-version-check build
(cd "$root" && "$work/buildenv/bin/python" -m build --wheel --outdir "$work/wheels" . >/dev/null)
cp "$root/constraints.txt" "$root/docker/requirements-serve.txt" "$root/docker/install-serve.sh" "$work/"
bash "$work/install-serve.sh" "$work/venv" "$work/wheels"
echo "verify: service venv $(du -sm "$work/venv" | cut -f1) MB, no torch"
# runtime stage: the image's CMD, from a folder that is not the repository
cp -r "$bundle" "$work/bundle"
port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
(cd "$work" && exec "$work/venv/bin/python" -m covidscan.serve "$work/bundle" --host 127.0.0.1 --port "$port") >"$work/server.log" 2>&1 &
server=$!
for _ in $(seq 1 60); do
    "$work/venv/bin/python" -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:$port/api/v1/health', timeout=4).status == 200 else 1)" 2>/dev/null && break
    sleep 0.5
done
"$work/venv/bin/python" - "$port" "$root" <<'PY' || { cat "$work/server.log"; exit 1; }
import json, sys, urllib.request, uuid
from pathlib import Path
port, root = sys.argv[1], Path(sys.argv[2])
base = f"http://127.0.0.1:{port}"
assert urllib.request.urlopen(base + "/api/v1/health", timeout=5).status == 200  # the HEALTHCHECK command's request

def post(name: str, data: bytes) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(base + "/api/v1/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())

image = sorted((root / "runs" / "demo-data" / "COVID").glob("*/*.png"))[0]
status, body = post("slice.png", image.read_bytes())
assert status == 200 and "not a diagnosis" in body["decision_support"], (status, body)
print("verify: predict 200,", {k: round(v, 3) for k, v in body["results"][0]["slices"][0]["probabilities"].items()})
status, body = post("notes.txt", b"not an image")
assert status == 415 and set(body) == {"error", "detail"}, (status, body)
print("verify: text upload ->", status, body["error"])
assert urllib.request.urlopen(base + "/", timeout=5).status == 200
PY
# the DICOM node from the same environment: a CT study in by C-STORE, the SR and the Secondary Capture back
free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
pacs_port=$(free_port); node_port=$(free_port)
(cd "$work" && exec "$work/venv/bin/covidscan" dicom-listen "$work/bundle" --send-to "127.0.0.1:$pacs_port:PACS" --port "$node_port" \
    --idle-seconds 1 --spool "$work/spool") >"$work/node.log" 2>&1 &
node=$!
"$work/venv/bin/covidscan" --version
"$work/venv/bin/python" - "$node_port" "$pacs_port" <<'PY' || { cat "$work/node.log"; exit 1; }
import sys, threading, time
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
node_port, pacs_port = int(sys.argv[1]), int(sys.argv[2])
received, done = [], threading.Event()
def on_store(event):
    received.append(str(event.dataset.SOPClassUID)); done.set() if len(received) == 2 else None
    return 0
pacs = AE(ae_title="PACS")
for uid in ("1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.7"):
    pacs.add_supported_context(uid, ExplicitVRLittleEndian)
server = pacs.start_server(("127.0.0.1", pacs_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
scanner = AE(ae_title="CT_SCANNER")
scanner.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
for _ in range(120):
    assoc = scanner.associate("127.0.0.1", node_port, ae_title="COVIDSCAN")
    if assoc.is_established:
        break
    time.sleep(0.5)
assert assoc.is_established, "the node did not start"
study, series = generate_uid(), generate_uid()
y, x = np.mgrid[-1:1:128j, -1:1:128j]
for k in range(3):
    ds = Dataset(); ds.file_meta = FileMetaDataset(); ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = CTImageStorage, generate_uid(), study, series
    ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "VERIFY-1", k + 1
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, -2.5 * k], [1, 0, 0, 0, 1, 0]
    ds.Rows = ds.Columns = 128
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    body = (x**2 / 0.8 + y**2 / 0.5) < 1
    ds.PixelData = np.where(body, 1064, 24).astype(np.uint16).tobytes()
    assert assoc.send_c_store(ds).Status == 0
assoc.release()
assert done.wait(120), f"no answer from the node: {received}"
server.shutdown()
print("verify: dicom-listen answered a CT study with", sorted(received))
PY
echo "verify: recipe OK in $(( $(date +%s) - started )) s"

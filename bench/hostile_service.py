"""Hostile uploads against a live service: status, time, peak memory growth, health latency per case.

    python bench/hostile_service.py runs/demo/bundle --scale full --out runs/hostile-after.json
    PYTHONPATH=/path/to/old/src python bench/hostile_service.py runs/demo/bundle --out runs/hostile-before.json

The service runs as `python -m covidscan.serve` in a child process (PYTHONPATH
picks the version under test). Before each case the child's peak-RSS counter
is reset (`/proc/PID/clear_refs` = 5), so "peak growth" is VmHWM after the
request minus VmRSS before it: the memory that one request cost at its worst.
While the request runs, another thread asks /api/v1/health every 50 ms and
keeps the slowest answer. A case that gets no answer within --timeout has its
server restarted. Linux only (reads /proc).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hostile_corpus import Case, cases, encoded_request  # noqa: E402

PART_HEADER = b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class Server:
    """One `python -m covidscan.serve` child process."""

    def __init__(self, bundle: str, api_key: str | None = None) -> None:
        self.bundle, self.api_key = bundle, api_key
        self.start()

    def start(self) -> None:
        self.port = _free_port()
        command = [sys.executable, "-m", "covidscan.serve", self.bundle, "--port", str(self.port)]
        if self.api_key:
            command += ["--api-key", self.api_key]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if self.get("/api/v1/health", 2)[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("service did not start: " + (self.process.stderr.read(4000).decode() if self.process.stderr else ""))

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def get(self, path: str, timeout: float) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def post(self, path: str, headers: dict[str, str], body: bytes, timeout: float) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.putrequest("POST", path, skip_accept_encoding=True)
            for key, value in headers.items():
                connection.putheader(key, value.encode("utf-8"))
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders()
            connection.send(body)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


def _health_watch(server: Server, stop: threading.Event, worst: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        try:
            server.get("/api/v1/health", 30)
        except OSError:
            pass
        worst[0] = max(worst[0], time.perf_counter() - started)
        stop.wait(0.05)


def run_case(server: Server, case: Case, timeout: float) -> dict[str, object]:
    path, headers, body = encoded_request(case)
    pid = server.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before_kb = _status_kb(pid, "VmRSS")
    stop, worst = threading.Event(), [0.0]
    watcher = threading.Thread(target=_health_watch, args=(server, stop, worst), daemon=True)
    watcher.start()
    started = time.perf_counter()
    status, text = 0, b""
    try:
        status, text = server.post(path, headers, body, timeout)
    except (TimeoutError, socket.timeout):
        status = -1  # no answer in time
    except OSError as exc:
        status, text = -2, str(exc).encode()
    seconds = time.perf_counter() - started
    stop.set()
    watcher.join()
    alive = server.process.poll() is None
    peak_kb = _status_kb(pid, "VmHWM") if alive else 0
    json_error = True
    if status >= 400:
        try:
            json_error = set(json.loads(text)) == {"error", "detail"}
        except ValueError:
            json_error = False
    row = {
        "case": case.name, "upload_bytes": len(body), "status": status, "seconds": round(seconds, 3),
        "peak_growth_mb": round((peak_kb - before_kb) / 1024, 1) if alive else None,
        "health_worst_s": round(worst[0], 3), "json_error": json_error, "expected": list(case.expect), "server_alive": alive,
    }
    if status < 0 or not alive:
        server.restart()
    return row


def stalled_upload(server: Server, observe: float) -> dict[str, object]:
    """Headers promise 100 kB, 10 bytes arrive, then nothing: is the connection closed within `observe` s?"""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 100000\r\n\r\n--b\r\nConte")
    sock.settimeout(observe)
    started = time.perf_counter()
    try:
        answer = sock.recv(4096)
    except (TimeoutError, socket.timeout):
        answer = b""
    seconds = time.perf_counter() - started
    sock.close()
    status = int(answer.split()[1]) if answer.startswith(b"HTTP/") else (0 if answer == b"" and seconds < observe else -1)
    return {"case": "stalled upload (body never finished)", "status": status, "seconds": round(seconds, 3), "closed": seconds < observe}


def chunked_over_limit(server: Server, megabytes: int) -> dict[str, object]:
    """A chunked body (no Content-Length) larger than the limit."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(60)
    sock.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    sock.sendall(b"%x\r\n%s\r\n" % (len(PART_HEADER), PART_HEADER))
    chunk = b"x" * (1 << 20)
    started = time.perf_counter()
    try:
        for _ in range(megabytes):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass
    try:
        answer = sock.recv(4096)
    except OSError:
        answer = b""
    sock.close()
    status = int(answer.split()[1]) if answer.startswith(b"HTTP/") else -1
    return {"case": f"chunked body of {megabytes} MB", "status": status, "seconds": round(time.perf_counter() - started, 3)}


def _cell(row: dict[str, object] | None) -> str:
    if row is None:
        return "-"
    status = int(row["status"])  # type: ignore[arg-type]
    shown = {-1: "no answer", -2: "connection error"}.get(status, str(status))
    growth = row.get("peak_growth_mb")
    memory = f", +{float(growth):,.0f} MB" if growth not in (None, 0.0) else ""  # type: ignore[arg-type]
    health = float(row.get("health_worst_s") or 0)  # type: ignore[arg-type]
    return f"{shown}, {float(row['seconds']):.2f} s{memory}" + (f", health {health:.1f} s" if health >= 1 else "")  # type: ignore[arg-type]


def table(before_path: Path, after_path: Path) -> str:
    """Markdown: every case that was wrong before (5xx, no answer, > 300 MB, health > 1 s, unexpected status), before vs after."""
    before = {r["case"]: r for r in json.loads(before_path.read_text())["rows"]}
    after = {r["case"]: r for r in json.loads(after_path.read_text())["rows"]}

    def wrong(row: dict[str, object]) -> bool:
        status = int(row["status"])  # type: ignore[arg-type]
        expected = row.get("expected")
        return (status >= 500 or status < 0 or float(row.get("peak_growth_mb") or 0) > 300  # type: ignore[arg-type]
                or float(row.get("health_worst_s") or 0) >= 1 or bool(expected and status not in expected)  # type: ignore[arg-type]
                or not row.get("json_error", True) or "stalled" in str(row["case"]))
    lines = ["| case | before (status, time, peak memory growth) | after |", "|---|---|---|"]
    for name, row in before.items():
        if wrong(row) or (name in after and wrong(after[name])):
            lines.append(f"| {name} | {_cell(row)} | {_cell(after.get(name))} |")
    for name, row in after.items():
        if name not in before:
            lines.append(f"| {name} (new case) | - | {_cell(row)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", default="runs/demo/bundle")
    parser.add_argument("--table", nargs=2, type=Path, metavar=("BEFORE", "AFTER"), help="print the before/after table of two --out files")
    parser.add_argument("--scale", choices=("ci", "full"), default="full")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one answer")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    if args.table:
        print(table(*args.table))
        return
    server, locked = Server(args.bundle), Server(args.bundle, api_key="s3cret")
    rows: list[dict[str, object]] = []
    try:
        for case in cases(args.scale):
            if args.only and args.only not in case.name:
                continue
            row = run_case(locked if case.locked else server, case, args.timeout)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not args.only:
            for row in (stalled_upload(server, 40.0), chunked_over_limit(server, 60)):
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        server.stop()
        locked.stop()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"pythonpath": os.environ.get("PYTHONPATH", ""), "scale": args.scale, "rows": rows}, indent=1))
    answered = [r for r in rows if "peak_growth_mb" in r and r["peak_growth_mb"] is not None]
    print(f"{len(rows)} cases; 5xx: {sum(1 for r in rows if int(r['status']) >= 500)}; no answer: {sum(1 for r in rows if int(r['status']) < 0)}; "
          f"worst peak growth {max(float(r['peak_growth_mb']) for r in answered):.0f} MB; "
          f"worst health {max(float(r.get('health_worst_s', 0)) for r in rows):.2f} s")


if __name__ == "__main__":
    main()

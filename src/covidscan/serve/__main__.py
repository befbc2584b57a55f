"""`python -m covidscan.serve BUNDLE [BUNDLE ...]`: the service without the training stack (what the Docker image runs).
Several bundles (one per modality, e.g. a CT and a chest X-ray model) are served together; serve/router.py routes."""
from __future__ import annotations

import argparse
import os
import sys

from covidscan.errors import CovidscanError
from covidscan.serve import DEFAULT_MAX_UPLOAD_MB


MAX_CONNECTIONS = 16  # open connections; beyond this uvicorn answers 503 (each may hold a body up to the upload limit)


def run_server(bundles: str | list[str], host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               api_key: str | None = None, cors_origins: list[str] | None = None, threads: int = 0,
               concurrency: int = 2, read_timeout_s: float = 30.0, max_connections: int = MAX_CONNECTIONS,
               view_memory_mb: float = 320.0) -> None:
    import uvicorn

    from covidscan.serve.app import create_app

    app = create_app(bundles, max_upload_mb, api_key or os.environ.get("COVIDSCAN_API_KEY") or None, cors_origins, threads,
                     concurrency, read_timeout_s, view_memory_mb)
    # uvicorn answers 503 once open connections reach limit_concurrency, so N connections need a limit of N + 1
    # (with the limit at 16, 16 keep-alive clients got 503 for 82 % of their requests; bench/serve_latency.py).
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, limit_concurrency=max_connections + 1,
                timeout_keep_alive=5)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m covidscan.serve", description="Serve exported covidscan bundles.")
    parser.add_argument("bundles", nargs="+", metavar="bundle", help="folder written by `covidscan export` (several: one per modality)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB)
    parser.add_argument("--api-key", default=None, help="require this X-API-Key (or set COVIDSCAN_API_KEY)")
    parser.add_argument("--cors-origin", action="append", default=None, help="allow this browser origin (repeatable); off by default")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all cores)")
    parser.add_argument("--concurrency", type=int, default=2, help="uploads decoded and analysed at once (bounds memory)")
    parser.add_argument("--read-timeout", type=float, default=30.0, help="seconds a request body may stall before 408")
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, help="open connections before 503")
    parser.add_argument("--view-memory-mb", type=float, default=320.0, help="memory for the study viewer's kept studies (oldest go first)")
    args = parser.parse_args()
    try:
        run_server(args.bundles, args.host, args.port, args.max_upload_mb, args.api_key, args.cors_origin, args.threads,
                   args.concurrency, args.read_timeout, args.max_connections, args.view_memory_mb)
    except CovidscanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The service's install steps, shared by the Dockerfile and docker/verify_recipe.sh so that
# the recipe proven on a machine without a Docker engine is the one the image runs.
# Usage: install-serve.sh VENV_DIR WHEEL_DIR   (the wheel of covidscan, built with --no-deps)
set -euo pipefail
venv="$1"; wheels="$2"
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check --no-cache-dir -c "$here/constraints.txt" -r "$here/requirements-serve.txt"
"$venv/bin/pip" install -q --disable-pip-version-check --no-cache-dir --no-deps "$wheels"/covidscan-*.whl
if "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "install-serve: torch must not be in the service environment" >&2
    exit 1
fi

#!/usr/bin/env bash
# Build docker/Dockerfile with Debian's podman on a base image made from Debian packages
# (debootstrap bookworm: Python 3.11), for machines without a Docker engine or Docker Hub.
# Then start the image's CMD from its file system as its non-root user (chroot) and check it
# over HTTP, for sandboxes where `podman run` cannot set rlimits. Needs root, podman, debootstrap
# and a bundle (make demo). Usage: docker/build_with_podman.sh [BUNDLE]   (default runs/demo/bundle)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bundle="${1:-runs/demo/bundle}"
base=localhost/debian-python:bookworm
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
if ! podman image exists "$base"; then
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$rootfs" http://deb.debian.org/debian
    # Behind a TLS-intercepting proxy the build's pip needs the host's CA bundle.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    tar -C "$rootfs" -c . | podman import - "$base"
fi
cd "$root"
podman build --format docker --network host --isolation chroot -f docker/Dockerfile \
    --build-arg BASE="$base" --build-arg BUNDLE="$bundle" -t covidscan-serve .
podman images covidscan-serve
mnt="$(podman image mount covidscan-serve)"
mount --bind /proc "$mnt/proc"; mount --bind /dev "$mnt/dev"
port=8011
chroot --userspec=10001:10001 "$mnt" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/home/covidscan \
    python3 -m covidscan.serve /models/bundle --host 127.0.0.1 --port "$port" >/tmp/covidscan-image.log 2>&1 &
server=$!
cleanup() { kill "$server" 2>/dev/null || true; sleep 1; umount "$mnt/proc" "$mnt/dev" || true; podman image unmount covidscan-serve >/dev/null || true; rm -rf "$rootfs"; }
trap cleanup EXIT
for _ in $(seq 1 60); do curl -sf "http://127.0.0.1:$port/api/v1/health" >/dev/null && break; sleep 0.5; done
# The image's HEALTHCHECK command, run inside the image as its user:
chroot --userspec=10001:10001 "$mnt" /opt/venv/bin/python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:$port/api/v1/health', timeout=4).status == 200 else 1)"
! chroot "$mnt" /opt/venv/bin/python3 -c "import torch" 2>/dev/null
images=("$root"/runs/demo-data/COVID/*/*.png)
image="${images[0]}"
test "$(curl -s -o /dev/null -w '%{http_code}' -F "files=@$image" "http://127.0.0.1:$port/api/v1/predict")" = 200
test "$(curl -s -o /dev/null -w '%{http_code}' -F "files=@/etc/hostname" "http://127.0.0.1:$port/api/v1/predict")" = 415
echo "image OK: health check passes as uid 10001, no torch, predict 200, text upload 415"

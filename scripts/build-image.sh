#!/usr/bin/env bash
# Build the project's Dockerfile without a daemon or a registry (CI, and any Debian machine as root).
#
#   bash scripts/build-image.sh [TAG]          # default TAG: localhost/metaplatform:dev
#
# Public registries are out of reach here, so the production base (a rayproject/ray CUDA image) is
# replaced by a local one: Debian bookworm (debootstrap minbase) with Debian's Python 3.11, made once
# and kept in podman's image store as $BASE_TAG (reused while it exists; `podman rmi` it to remake).
# The real Dockerfile is then built on it with buildah (--isolation chroot: no daemon, no user
# namespaces), with the CPU torch wheel from $WHEELS as the `wheels` build context and this machine's
# CA bundle as a build secret (HTTPS is intercepted by a proxy here), which never enters the image.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG="${1:-localhost/metaplatform:dev}"
BASE_TAG="${METAPLATFORM_BASE_IMAGE:-localhost/metaplatform-base:bookworm-py311}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WHEELS="${TORCH_WHEELS:-/opt/wheels}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0+cpu}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

for tool in buildah podman debootstrap; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (bash scripts/system-packages.sh)" >&2; exit 2; }
done

if ! podman image exists "$BASE_TAG"; then
    echo "making the local base image $BASE_TAG (debootstrap, about a minute)"
    rootfs="$(mktemp -d /var/tmp/metaplatform-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    # What the production base provides and the image relies on: python3 with venv, bash, ca-certificates
    # (HTTPS to S3 at run time) and wget (KubeRay's exec probes call it).
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,wget \
        bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; exit 1; }
    rm -f "$rootfs.log"
    # Downloaded .debs and package lists are not part of a base image.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$BASE_TAG" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
fi

previous="$(podman image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)"
secret=()
[ -s "$CA_BUNDLE" ] && secret=(--secret "id=ca,src=$CA_BUNDLE")
# --layers: unchanged steps are reused (torch while the base and TORCH_SPEC stay the same, the
# requirements while pyproject.toml does). --format docker: the OCI format drops SHELL, and with it
# the Dockerfile's `pipefail`.
buildah bud --isolation chroot --layers --format docker --quiet \
    --build-arg "BASE_IMAGE=$BASE_TAG" \
    --build-arg "TORCH_SPEC=$TORCH_SPEC" \
    --build-arg "TORCH_INDEX_URL=https://pypi.org/simple" \
    --build-context "wheels=$WHEELS" \
    "${secret[@]}" \
    --tag "$TAG" .
# The image this tag named before is dead weight now (2 GB); its shared layers stay with the new one.
current="$(podman image inspect --format '{{.Id}}' "$TAG")"
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    podman rmi "$previous" >/dev/null 2>&1 || true
fi
echo "built $TAG"

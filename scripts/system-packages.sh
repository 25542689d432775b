#!/usr/bin/env bash
# Debian packages the test suite runs for real: PostgreSQL (MLflow's backend store), Prometheus,
# and the daemonless container tools that build and run the Dockerfile (buildah, podman, runc,
# debootstrap for a local base image). Installs what is missing when run as root on Debian;
# otherwise says what to install. Training itself needs none of them.
set -euo pipefail
PACKAGES=(postgresql prometheus buildah podman runc debootstrap)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian packages for the tests: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d 101: the packages' own services (postgresql, prometheus) are not started; the
    # tests start private instances on loopback.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
else
    echo "note: the tests need these Debian packages: ${missing[*]} (sudo apt-get install ${missing[*]})" >&2
fi

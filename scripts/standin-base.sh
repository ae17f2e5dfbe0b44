#!/usr/bin/env bash
# The CPU stand-in's base image, as a root filesystem tarball: what `docker import` turns into the image
# the Dockerfile builds FROM in place of vLLM's (no image registry is needed). Prints the tarball's path.
#
# It plays vLLM v0.20.2's image (docs/container.md, "What the Dockerfile assumes about vLLM's image"): Ubuntu
# (24.04 here, for its CPython 3.12; vLLM's image is 22.04 with a CPython 3.12 of its own), python3 with pip
# and no PEP 668 marker, root, curl, and our dependencies already installed at the versions vLLM's image
# has (constraints/vllm-v0.20.2.txt), plus setproctitle, which the stand-in server needs and vLLM ships.
#
# Built once per machine and kept under STANDIN_BASE_CACHE, keyed by this script and the constraints file
# (about 5 minutes and 0.5 GB; Ubuntu's and PyPI's archives must be reachable). Two runs at once: the
# second waits for the first (flock) and reuses its tarball. Needs root and debootstrap (apt-get install
# debootstrap).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${STANDIN_BASE_CACHE:=/var/cache/vllm-cuda-suspend}"
suite=noble
mirror=http://archive.ubuntu.com/ubuntu
# Ubuntu's archive keyring, so that debootstrap checks what it downloads: the .deb from noble's archive,
# itself checked against the SHA-256 that noble's signed package index lists for it.
keyring_deb_url=$mirror/pool/main/u/ubuntu-keyring/ubuntu-keyring_2023.11.28.1_all.deb
keyring_deb_sha256=36de43b15853ccae0028e9a767613770c704833f82586f28eb262f0311adb8a8
constraints=constraints/vllm-v0.20.2.txt
# vLLM's image has these (requirements/common.txt at v0.20.2 and what they pull in); the constraints file
# fixes their versions. setuptools in vLLM's range: the Dockerfile builds our package without build
# isolation, with the image's setuptools, so that it needs no index when everything is already installed.
packages=(aiohttp click psutil supervisor loguru nvidia-ml-py requests setproctitle 'setuptools>=77.0.3,<81')

key=$(cat "$0" "$constraints" | sha256sum | cut -c1-16)
tarball=$STANDIN_BASE_CACHE/standin-base-$suite-$key.tar
mkdir -p "$STANDIN_BASE_CACHE"
exec 9>"$STANDIN_BASE_CACHE/standin-base.lock"
flock 9
if [[ -s $tarball ]]; then
  printf '%s\n' "$tarball"
  exit 0
fi

work=$(mktemp -d "$STANDIN_BASE_CACHE/build.XXXXXX")
root=$work/root
cleanup() {
  umount "$root/proc" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

log() { printf 'standin-base: %s\n' "$*" >&2; }

log "Ubuntu's archive keyring ($keyring_deb_url)"
curl -fsSL --retry 3 -o "$work/keyring.deb" "$keyring_deb_url"
if ! echo "$keyring_deb_sha256  $work/keyring.deb" | sha256sum -c --quiet - >/dev/null 2>&1; then
  log "ubuntu-keyring's SHA-256 is $(sha256sum "$work/keyring.deb" | cut -d' ' -f1), expected $keyring_deb_sha256"
  exit 1
fi
dpkg-deb -x "$work/keyring.deb" "$work/keyring"

log "debootstrap $suite into $root (a few minutes)"
debootstrap --variant=minbase --components=main,universe --keyring="$work/keyring/usr/share/keyrings/ubuntu-archive-keyring.gpg" \
  --include=python3,python3-pip,ca-certificates,curl,procps \
  "$suite" "$root" "$mirror" /usr/share/debootstrap/scripts/gutsy >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; log "debootstrap failed (log above)"; exit 1; }

# vLLM's image has no PEP 668 marker: pip installs into its Python as it does there.
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
cp /etc/resolv.conf "$root/etc/resolv.conf"
# The host's certificate authorities, for pip: some sites inspect TLS with a CA of their own.
cp /etc/ssl/certs/ca-certificates.crt "$root/tmp/host-ca.crt"
cp "$constraints" "$root/tmp/constraints.txt"
mount -t proc proc "$root/proc"
log "pip install ${packages[*]} (-c $constraints)"
# A clean environment: the host's pip and TLS variables name host paths.
chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root PIP_ROOT_USER_ACTION=ignore \
  PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/tmp/host-ca.crt \
  python3 -m pip install --quiet --no-cache-dir --index-url https://pypi.org/simple \
  -c /tmp/constraints.txt "${packages[@]}"
umount "$root/proc"
rm -f "$root/tmp/constraints.txt" "$root/tmp/host-ca.crt" "$root/etc/resolv.conf"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

tar -C "$root" -cf "$work/base.tar" .
mv "$work/base.tar" "$tarball"
log "built $tarball ($(du -h "$tarball" | cut -f1))"
printf '%s\n' "$tarball"

#!/usr/bin/env bash
# The CPU stand-in's base image, as a root filesystem tarball: what `docker import` turns into the image
# the Dockerfile builds FROM in place of vLLM's (no image registry is needed). Prints the tarball's path.
#
# It plays vLLM v0.20.2's image (docs/container.md, "What the Dockerfile assumes about vLLM's image"): a
# Debian-family system (Debian 12 here; vLLM's image is Ubuntu 22.04), python3 with pip and no PEP 668 marker,
# root, curl, and our dependencies already installed at the versions vLLM's image has
# (constraints/vllm-v0.20.2.txt), plus setproctitle, which the stand-in server needs and vLLM ships. What
# differs: Python 3.11 (Debian 12's) where vLLM's image has 3.12 built from source; the project supports 3.10+.
#
# Only the package registries this project may use: Debian's archive, through the mirror this machine's own apt
# is configured with (debootstrap's default where none is found), checked with the host's Debian archive
# keyring; and PyPI through pip's ordinary configuration. Built once per machine and kept under
# STANDIN_BASE_CACHE, keyed by this script and the constraints file (about 4 minutes and 0.4 GB). Two runs at
# once: the second waits for the first (flock) and reuses its tarball. Needs root and debootstrap
# (apt-get install debootstrap).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${STANDIN_BASE_CACHE:=/var/cache/vllm-cuda-suspend}"
suite=bookworm
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
constraints=constraints/vllm-v0.20.2.txt
# vLLM's image has these (requirements/common.txt at v0.20.2 and what they pull in); the constraints file
# fixes their versions. setuptools in vLLM's range: the Dockerfile builds our package without build
# isolation, with the image's setuptools, so that it needs no index when everything is already installed.
packages=(aiohttp click psutil supervisor loguru nvidia-ml-py requests setproctitle 'setuptools>=77.0.3,<81')

# The Debian mirror this machine's apt uses (deb822 `URIs:` or a one-line `deb` entry), so that the build
# reaches only what apt-get here reaches.
host_debian_mirror() {
  local files=(/etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list)
  {
    awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }' "${files[@]}" 2>/dev/null
    awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' "${files[@]}" 2>/dev/null
  } | grep -E '/debian/?$' | head -n 1
}

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

mirror=$(host_debian_mirror || true)
[[ -r $keyring ]] || { log "no $keyring: apt-get install debian-archive-keyring"; exit 1; }
log "debootstrap $suite into $root (a few minutes)"
debootstrap --variant=minbase --keyring="$keyring" --include=python3,python3-pip,ca-certificates,curl,procps \
  "$suite" "$root" ${mirror:+"$mirror"} >"$work/debootstrap.log" 2>&1 \
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
  python3 -m pip install --quiet --no-cache-dir \
  -c /tmp/constraints.txt "${packages[@]}"
umount "$root/proc"
rm -f "$root/tmp/constraints.txt" "$root/tmp/host-ca.crt" "$root/etc/resolv.conf"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

tar -C "$root" -cf "$work/base.tar" .
mv "$work/base.tar" "$tarball"
log "built $tarball ($(du -h "$tarball" | cut -f1))"
printf '%s\n' "$tarball"

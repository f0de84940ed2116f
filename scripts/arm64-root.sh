#!/usr/bin/env bash
# An emulated arm64 (aarch64) Debian bookworm root with the fleetfl agent installed the way the
# Ansible role installs it on a 64-bit Raspberry Pi OS (bookworm arm64 is its base):
#   1. qemu-user-static + binfmt_misc, so aarch64 binaries run on this x86 host;
#   2. debootstrap --arch=arm64 (minbase + python3, python3-venv, ca-certificates);
#   3. inside the root, as the role's tasks/venv.yml does: the constraint file (torch pinned
#      to the aarch64 CPU build, fleet_torch_spec.aarch64), a wheelhouse filled once by
#      `pip download` with the device's own markers (what the role's first host of an
#      architecture does), then the venv installed from that wheelhouse with --no-index;
#   4. the fleetfl wheel built on the host from the working tree (pure Python).
# Reused when present: steps 2-3 run only when their stamp is missing; step 4 every time
# (--no-deps, seconds). Usage (root):  scripts/arm64-root.sh [ROOT]
# Env: FLEETFL_ARM64_TORCH (default torch==2.10.0), FLEETFL_ARM64_EXTRAS (e.g. "[digits]").
set -euo pipefail

ROOT=${1:-${FLEETFL_ARM64_ROOT:-/var/lib/fleetfl-arm64/root}}
TORCH=${FLEETFL_ARM64_TORCH:-torch==2.10.0}
EXTRAS=${FLEETFL_ARM64_EXTRAS:-}
HERE=$(cd "$(dirname "$0")/.." && pwd)
HOST_PY=${HOST_PY:-$HERE/.venv/bin/python}
say() { echo "arm64-root: $*" >&2; }

[ "$(id -u)" = 0 ] || { say "needs root (debootstrap, chroot, binfmt_misc)"; exit 2; }

# -- 1. emulation --------------------------------------------------------------------------
if ! command -v qemu-aarch64-static >/dev/null || ! command -v update-binfmts >/dev/null \
   || ! command -v debootstrap >/dev/null; then
  say "installing qemu-user-static binfmt-support debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static binfmt-support debootstrap >&2
fi
[ -e /proc/sys/fs/binfmt_misc/status ] || mount binfmt_misc -t binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 \
  || { say "binfmt_misc has no enabled qemu-aarch64 entry"; exit 3; }

# -- 2. the Debian root --------------------------------------------------------------------
if [ ! -e "$ROOT/.debootstrap-done" ]; then
  MIRROR=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' \
             /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
           | awk '{print $2}' | head -n1 || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  say "debootstrap arm64 bookworm into $ROOT from $MIRROR (several minutes)"
  rm -rf "$ROOT"; mkdir -p "$(dirname "$ROOT")"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOT" "$MIRROR" >&2
  touch "$ROOT/.debootstrap-done"
fi
[ "$(chroot "$ROOT" python3 -c 'import platform; print(platform.machine())')" = aarch64 ] \
  || { say "python3 in $ROOT is not aarch64"; exit 3; }

# Name resolution and this host's CA bundle (pip trusts what the host trusts).
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp -L /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/host-ca-certificates.crt"
PIPENV=(env -i PATH=/usr/bin:/bin HOME=/root PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180)

# -- 4 (first half). the package, built on the host ---------------------------------------
BUILD=$(mktemp -d); trap 'rm -rf "$BUILD"' EXIT
"$HOST_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$BUILD" "$HERE" >&2
WHEEL=$(ls "$BUILD"/fleetfl-*.whl)
mkdir -p "$ROOT/opt/fleetfl/dist"
rm -f "$ROOT"/opt/fleetfl/dist/fleetfl-*.whl
cp "$WHEEL" "$ROOT/opt/fleetfl/dist/"
IN_WHEEL=/opt/fleetfl/dist/$(basename "$WHEEL")

# -- 3. wheelhouse and venv, as tasks/venv.yml ---------------------------------------------
STAMP="$ROOT/opt/fleetfl/.venv-done-$(echo "$TORCH $EXTRAS" | md5sum | cut -c1-12)"
if [ ! -e "$STAMP" ]; then
  say "venv in $ROOT/opt/fleetfl/venv: $TORCH, fleetfl$EXTRAS (pip under emulation: minutes)"
  printf '%s\n' "# fleetfl: torch for this machine (aarch64: CPU-only wheels on PyPI)" "$TORCH" \
    > "$ROOT/opt/fleetfl/constraints.txt"
  rm -rf "$ROOT/opt/fleetfl/venv" "$ROOT/opt/fleetfl/wheelhouse"
  chroot "$ROOT" "${PIPENV[@]}" python3 -m venv /opt/fleetfl/venv
  # The wheelhouse: what the role's first host of an architecture downloads, once.
  chroot "$ROOT" "${PIPENV[@]}" /opt/fleetfl/venv/bin/pip download -q \
    -d /opt/fleetfl/wheelhouse -c /opt/fleetfl/constraints.txt \
    "$TORCH" "fleetfl$EXTRAS @ file://$IN_WHEEL" 'setuptools>=69' >&2
  rm -f "$ROOT"/opt/fleetfl/wheelhouse/fleetfl-*.whl
  # Every other device: no index at all, only the wheelhouse.
  chroot "$ROOT" "${PIPENV[@]}" /opt/fleetfl/venv/bin/pip install -q --no-index \
    --find-links /opt/fleetfl/wheelhouse -c /opt/fleetfl/constraints.txt "$TORCH" >&2
  touch "$STAMP"
fi
# -- 4 (second half). this working tree's package, its dependencies from the wheelhouse ----
chroot "$ROOT" "${PIPENV[@]}" /opt/fleetfl/venv/bin/pip install -q --no-index \
  --find-links /opt/fleetfl/wheelhouse -c /opt/fleetfl/constraints.txt \
  --force-reinstall --no-deps "$IN_WHEEL" >&2
chroot "$ROOT" "${PIPENV[@]}" /opt/fleetfl/venv/bin/pip install -q --no-index \
  --find-links /opt/fleetfl/wheelhouse -c /opt/fleetfl/constraints.txt \
  "fleetfl$EXTRAS @ file://$IN_WHEEL" >&2
chroot "$ROOT" /opt/fleetfl/venv/bin/python -c '
import platform, torch
assert torch.version.cuda is None and "+cu" not in torch.__version__, torch.__version__
print(platform.machine(), "torch", torch.__version__, "cuda", torch.version.cuda)'
echo "$ROOT"

#!/usr/bin/env bash
# Build the Mosquitto image the integration tests run in (tests/conftest.py), without any
# registry: a Debian root made by debootstrap from apt's own mirror, cut down to mosquitto, its
# libraries and a shell, then `docker import`ed as $FLEETFL_BROKER_IMAGE.
#
#   scripts/broker-image.sh                 start dockerd if needed, build the image if missing
#                                           or built from another recipe; fails loudly (CI)
#   scripts/broker-image.sh --if-possible   the same, but says why and exits 0 when it cannot
#                                           (no Docker, no permission, not root): `make test`
#   scripts/broker-image.sh --hash          print the recipe hash and exit
#
# Idempotent: the image carries the hash of the recipe below as the label org.fleetfl.recipe;
# an image with the current hash is kept, a change to the recipe rebuilds it. Building needs
# root (debootstrap, chroot) and the Debian mirror; running the tests needs neither.
# dockerd, when this script starts it, logs to $FLEETFL_DOCKERD_LOG (/var/log/dockerd.log).
set -euo pipefail

IMAGE="${FLEETFL_BROKER_IMAGE:-fleetfl/mosquitto:2.0.11}"
DOCKERD_LOG="${FLEETFL_DOCKERD_LOG:-/var/log/dockerd.log}"
CACHE_DIR="${FLEETFL_BROKER_IMAGE_CACHE:-/var/cache/fleetfl-broker-image}"  # the .debs
SELF="$(readlink -f "$0")"

best_effort=0
case "${1:-}" in
  --if-possible) best_effort=1 ;;
  --hash) ;;
  "") ;;
  *) echo "usage: $0 [--if-possible | --hash]" >&2; exit 2 ;;
esac

# The recipe: everything between these markers is hashed (with the image name).
# >>> recipe
SUITE=bookworm
MOSQUITTO_VERSION=2.0.11
CMD='["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]'
# What the image keeps of the Debian root (plus the shared libraries these need).
KEEP_PROGRAMS=(/usr/sbin/mosquitto /usr/bin/mosquitto_passwd /usr/bin/dash)
KEEP_FILES=(/etc/passwd /etc/group /etc/nsswitch.conf /etc/mosquitto/mosquitto.conf)
DEFAULT_CONFIG='# the tests mount their own file over this one (tests/conftest.py)
listener 1883
allow_anonymous true
persistence true
persistence_location /mosquitto/data/
log_dest stderr'  # 2.0.11 does not flush stdout

make_root() {  # make_root DIR MIRROR: a minimal Debian root with mosquitto installed
  mkdir -p "$CACHE_DIR"
  debootstrap --variant=minbase --include=mosquitto --cache-dir="$CACHE_DIR" \
    "$SUITE" "$1" "$2" >"$1.log" 2>&1 || { tail -20 "$1.log" >&2; return 1; }
  local version
  version="$(chroot "$1" dpkg-query -W -f '${Version}' mosquitto)"
  [[ "$version" == "$MOSQUITTO_VERSION"-* ]] || {
    echo "debootstrap installed mosquitto $version, not $MOSQUITTO_VERSION" >&2; return 1; }
}

slim_root() {  # slim_root ROOT SLIM: only the programs, their libraries and the broker's dirs
  local root="$1" slim="$2" f lib
  mkdir -p "$slim"/usr/{bin,sbin,lib,lib64} "$slim"/etc "$slim"/tmp "$slim"/var/lib/mosquitto \
    "$slim"/mosquitto/{config,data,log}
  for d in bin sbin lib lib64; do ln -s "usr/$d" "$slim/$d"; done  # merged /usr, as Debian
  chmod 1777 "$slim/tmp"
  for f in "${KEEP_PROGRAMS[@]}" "${KEEP_FILES[@]}"; do
    mkdir -p "$slim$(dirname "$f")"
    cp -L "$root$f" "$slim$f"
  done
  ln -s dash "$slim/usr/bin/sh"
  for f in "${KEEP_PROGRAMS[@]}"; do
    # `ldd` prints "name => /path (addr)" and the loader as "/path (addr)"
    chroot "$root" ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
  done | sort -u | while read -r lib; do
    mkdir -p "$slim$(dirname "$lib")"
    cp -L "$root$lib" "$slim$lib"
  done
  printf '%s\n' "$DEFAULT_CONFIG" >"$slim/mosquitto/config/mosquitto.conf"
  # As root, mosquitto drops to user mosquitto: it owns the data and log dirs (a new named
  # volume mounted on /mosquitto/data copies this ownership).
  local ids
  ids="$(awk -F: '$1 == "mosquitto" {print $3 ":" $4}' "$root/etc/passwd")"
  chown "$ids" "$slim"/mosquitto/{data,log} "$slim"/var/lib/mosquitto
}
# <<< recipe

recipe_hash() {
  { echo "$IMAGE"; sed -n '/^# >>> recipe$/,/^# <<< recipe$/p' "$SELF"; } \
    | sha256sum | cut -c1-16
}
HASH="$(recipe_hash)"
if [[ "${1:-}" == "--hash" ]]; then echo "$HASH"; exit 0; fi

cannot() {  # cannot REASON: give up, loudly unless best effort
  if ((best_effort)); then
    echo "broker-image: $1; integration tests will use the mosquitto binary" >&2
    exit 0
  fi
  echo "broker-image: $1" >&2
  exit 1
}

debian_mirror() {  # the Debian mirror apt uses (not -security), e.g. http://deb.debian.org/debian
  local mirror="${FLEETFL_DEBIAN_MIRROR:-}"
  if [[ -z "$mirror" ]]; then
    mirror="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                  /etc/apt/sources.list.d/*.sources 2>/dev/null \
      | awk '/^deb / {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}
             /^URIs:/ {for (i = 2; i <= NF; i++) print $i}' \
      | grep -E '/debian/?$' | head -1 || true)"
  fi
  echo "${mirror:-http://deb.debian.org/debian}"
}

# -- the engine -------------------------------------------------------------------------------
command -v docker >/dev/null 2>&1 || cannot "no docker command (Debian: apt-get install docker.io)"
if ! docker info >/dev/null 2>&1; then
  if [[ -S /var/run/docker.sock ]] && pgrep -x dockerd >/dev/null 2>&1; then
    cannot "dockerd runs but does not answer you (permission? add yourself to group docker)"
  fi
  command -v dockerd >/dev/null 2>&1 || cannot "no dockerd to start (apt-get install docker.io)"
  [[ "$(id -u)" -eq 0 ]] || cannot "dockerd is not running and only root may start it"
  echo "broker-image: starting dockerd (log: $DOCKERD_LOG)"
  start=$(date +%s.%N)
  # its own session: it outlives this script and a Ctrl-C of make
  setsid -f dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null
  for _ in $(seq 300); do
    docker info >/dev/null 2>&1 && break
    sleep 0.1
  done
  docker info >/dev/null 2>&1 || cannot "dockerd did not answer within 30 s (see $DOCKERD_LOG)"
  echo "broker-image: dockerd answered after $(awk "BEGIN {print $(date +%s.%N) - $start}") s"
fi

# -- the image --------------------------------------------------------------------------------
have="$(docker image inspect -f '{{ index .Config.Labels "org.fleetfl.recipe" }}' "$IMAGE" \
          2>/dev/null || true)"
if [[ "$have" == "$HASH" ]]; then
  echo "broker-image: $IMAGE is up to date (recipe $HASH)"
  exit 0
fi
[[ "$(id -u)" -eq 0 ]] || cannot "building $IMAGE needs root (debootstrap): sudo $0"
command -v debootstrap >/dev/null 2>&1 || cannot "no debootstrap (apt-get install debootstrap)"

exec 9>/var/lock/fleetfl-broker-image.lock  # one build at a time
flock 9
have="$(docker image inspect -f '{{ index .Config.Labels "org.fleetfl.recipe" }}' "$IMAGE" \
          2>/dev/null || true)"
if [[ "$have" == "$HASH" ]]; then echo "broker-image: $IMAGE was just built"; exit 0; fi

old_id="$(docker image inspect -f '{{ .Id }}' "$IMAGE" 2>/dev/null || true)"
mirror="$(debian_mirror)"
work="$(mktemp -d /var/tmp/fleetfl-broker-image.XXXXXX)"
trap 'rm -rf "$work"' EXIT
echo "broker-image: building $IMAGE (recipe $HASH${have:+, was $have}) from $mirror"
start=$(date +%s)
make_root "$work/root" "$mirror" || cannot "debootstrap failed"
slim_root "$work/root" "$work/slim"
tar -C "$work/slim" --numeric-owner -c . \
  | docker import --change "CMD $CMD" --change "EXPOSE 1883" \
      --change "LABEL org.fleetfl.recipe=$HASH" --change "WORKDIR /mosquitto" - "$IMAGE" \
      >/dev/null
if [[ -n "$old_id" && "$old_id" != "$(docker image inspect -f '{{ .Id }}' "$IMAGE")" ]]; then
  docker image rm "$old_id" >/dev/null 2>&1 || true  # still used by a container: kept
fi
says="$(docker run --rm "$IMAGE" /usr/sbin/mosquitto -h 2>&1 || true)"
[[ "$says" == *"mosquitto version $MOSQUITTO_VERSION"* ]] \
  || cannot "the built image does not run mosquitto $MOSQUITTO_VERSION: ${says:0:300}"
size="$(docker image inspect -f '{{ .Size }}' "$IMAGE")"
echo "broker-image: built $IMAGE in $(($(date +%s) - start)) s ($((size / 1000000)) MB)"

#!/usr/bin/env bash
# Build the UGA Serve OCI images offline with podman (no Docker daemon, no registry):
#   1. a Debian bookworm base made with mmdebstrap (python3, venv, CA certificates, C++ runtime),
#   2. every Python dependency as a wheel, downloaded on the host from the package index: exactly the
#      versions and sha256 hashes of image/locks/<variant>.txt (written by image/lock.py, make lock),
#   3. images installed from those wheels with --network=none and --require-hashes (image/Containerfile).
#
#   image/build.sh            serve + runner        (localhost/uga-serve:VERSION, localhost/uga-runner:VERSION)
#   image/build.sh gpu        the GPU serving image (localhost/uga-serve-gpu:VERSION; needs onnxruntime-gpu)
#
# Each image is also tagged VERSION-<commit> (12 hex digits): push and deploy that tag (or the
# digest), so every node runs the same build and a rebuild rolls out.
#
# VERSION is pyproject.toml's version: the one source of truth, also the tag k8s/base references.
# Output under build/image/ (ignored by git): base.tar, wheels/, containers.conf, sizes.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/build/image
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
MODEL_VERSION=$("$PY" -c 'import json; print(json.load(open("models/baseline/card.json"))["version"])')
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain 2>/dev/null)" ] || REVISION="$REVISION-dirty"
[[ $REVISION == *-dirty ]] && REV_TAG="${REVISION:0:12}-dirty" || REV_TAG=${REVISION:0:12}
# Timestamps in the base from the commit's time (SOURCE_DATE_EPOCH). It does not pin package
# versions: the base takes bookworm's packages as of the day it is made (REBUILD_BASE=1 to remake it
# with the security updates since; for pinned versions, point mmdebstrap at snapshot.debian.org).
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
BASE=localhost/uga-base:bookworm
VARIANTS=${*:-serve runner}

fail() { echo "image: error: $*" >&2; exit 2; }
image_for() {
  case "$1" in
    serve) echo "localhost/uga-serve:$VERSION" ;;
    runner) echo "localhost/uga-runner:$VERSION" ;;
    gpu) echo "localhost/uga-serve-gpu:$VERSION" ;;
    *) fail "unknown variant $1 (serve, runner, gpu)" ;;
  esac
}

for variant in $VARIANTS; do image_for "$variant" >/dev/null; done
for tool in podman mmdebstrap; do
  command -v "$tool" >/dev/null || fail "$tool not found: apt-get install podman buildah mmdebstrap runc"
done
mkdir -p "$OUT"
# Host quirks (../ENVIRONMENT): crun refuses hybrid cgroups, root cannot raise rlimits.
cat > "$OUT/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$OUT/containers.conf
started=$(date +%s)
step() { echo "image: [$(( $(date +%s) - started ))s] $*" >&2; }

if [ "${REBUILD_BASE:-0}" = 1 ] && podman image exists "$BASE"; then
  podman rmi --force "$BASE" >/dev/null
fi
if ! podman image exists "$BASE"; then
  step "base: mmdebstrap bookworm (minbase)"
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates,libstdc++6,libgomp1 \
    --aptopt='Acquire::Retries "3"' bookworm "$OUT/base.tar" \
    || fail "could not make the Debian base with mmdebstrap (is the Debian mirror reachable?)"
  podman import --quiet "$OUT/base.tar" "$BASE" >/dev/null
  rm -f "$OUT/base.tar"
fi
# Can this machine run containers at all (runtime, cgroups, port publishing)?
probe=$(podman run --rm -p 127.0.0.1::9 "$BASE" true 2>&1) \
  || fail "podman cannot run containers on this machine: $(echo "$probe" | tail -1)"

# One wheel directory for all variants (the build context): exactly the wheels of each variant's
# lock (image/locks/, by version and sha256; make lock rewrites them), and this project as a wheel.
rm -rf "$OUT/context" && mkdir -p "$OUT/context/wheels" "$OUT/context/locks"
rm -f "$OUT/wheels/uga_serve-"*.whl
for variant in $VARIANTS; do
  lock=image/locks/$variant.txt
  [ -f "$lock" ] || fail "no $lock: run make lock"
  step "wheels for $variant ($lock)"
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --require-hashes \
    -d "$OUT/wheels" -r "$lock" > "$OUT/pip.log" 2>&1 \
    || { tail -5 "$OUT/pip.log" >&2; fail "could not get the wheels of $lock (is the package index reachable? a hash mismatch: see $OUT/pip.log)"; }
  cp "$lock" "$OUT/context/locks/"
done
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$OUT/wheels" . > "$OUT/pip.log" 2>&1 \
  || { tail -5 "$OUT/pip.log" >&2; fail "could not build the uga-serve wheel"; }
cp -l "$OUT/wheels/"*.whl "$OUT/context/wheels/" 2>/dev/null || cp "$OUT/wheels/"*.whl "$OUT/context/wheels/"

: > "$OUT/sizes.txt"
for variant in $VARIANTS; do
  image=$(image_for "$variant")
  step "build $image"
  podman build --quiet --no-cache --network=none --pull=never -f image/Containerfile \
    --build-arg BASE="$BASE" --build-arg ROLE="$variant" \
    --build-arg VERSION="$VERSION" --build-arg REVISION="$REVISION" --build-arg MODEL_VERSION="$MODEL_VERSION" \
    -t "$image" -t "$image-$REV_TAG" "$OUT/context" >/dev/null  # also by commit: a rebuild is a new tag
  size=$(podman image inspect "$image" --format '{{.Size}}')
  echo "$image $size" >> "$OUT/sizes.txt"
done
rm -rf "$OUT/context"
# One image per role stays on this machine: earlier commits' tags are dropped, then the builds no tag
# names any more (a machine that builds every commit would otherwise fill its disk).
for variant in $VARIANTS; do
  repo=$(image_for "$variant"); repo=${repo%%:*}
  podman images --format '{{.Repository}}:{{.Tag}}' --filter "reference=$repo" \
    | grep -F "$repo:$VERSION-" | grep -vxF "$repo:$VERSION-$REV_TAG" | xargs -r -n1 podman untag || true
  podman image prune --force --filter "label=org.opencontainers.image.title=uga-serve-$variant" >/dev/null || true
done
step "done"
awk '{printf "%-40s %6.0f MB\n", $1, $2 / 1e6}' "$OUT/sizes.txt"

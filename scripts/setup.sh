#!/usr/bin/env bash
# Idempotent set-up: Debian packages, a virtualenv in .venv, the project and its dev tools.
#   TORCH_SPEC   pip requirement for torch (default: torch==2.13.0, the CPU build).
#                GPU users: TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
#   PARLE_SKIP_APT=1  skip the Debian packages (non-Debian machines; install the equivalents yourself)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
APT_PACKAGES=(dataset-fashion-mnist prometheus)
VENV=.venv

if [[ "${PARLE_SKIP_APT:-0}" != 1 ]] && command -v apt-get >/dev/null; then
    missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        echo "setup: installing Debian packages: ${missing[*]}"
        SUDO=""; [[ $(id -u) == 0 ]] || SUDO=sudo
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
fi

[[ -x $VENV/bin/python ]] || { echo "setup: creating $VENV"; python3 -m venv "$VENV"; }

# Reinstall only when what we install changes.
stamp=$VENV/.parle-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$TORCH_SPEC
if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
    echo "setup: installing Python packages ($TORCH_SPEC)"
    # torch first, on its own, so the pinned CPU build is the one the project's range is checked against.
    # shellcheck disable=SC2086
    $VENV/bin/python -m pip install -q $TORCH_SPEC
    $VENV/bin/python -m pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
fi
# Stubs are tied to the installed grpcio/protobuf, so they are generated here, never committed.
$VENV/bin/python -m protos.generate >/dev/null

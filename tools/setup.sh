#!/usr/bin/env bash
# One-shot set-up on a fresh machine (Debian/Ubuntu, Python >= 3.10, a C compiler):
#   1. a virtual environment in .venv (override with VENV=...),
#   2. grafos-fabric installed editable with its test and benchmark extras
#      (this compiles the native ring through cffi),
#   3. the optional UCX driver: libucx-dev + ucx-utils with apt (as root; skipped
#      with a warning otherwise, or when GRAFOS_SKIP_UCX=1); the UCX binding is
#      built by step 2 only where the headers are then found,
#   4. the optional RDMA verbs support: Debian's python3-pyverbs linked into the
#      venv (tools/install_pyverbs.sh; skipped with a warning where it can't work,
#      or when GRAFOS_SKIP_PYVERBS=1).
# Safe to run again: every step is idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq build-essential
  else
    echo "setup: a C compiler is needed to build the native ring (install build-essential)" >&2
    exit 1
  fi
fi
if ! command -v losetup >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq util-linux  # losetup: block tests on a real loop device
fi

if [ "${GRAFOS_SKIP_UCX:-0}" != 1 ] && ! { pkg-config --exists ucx 2>/dev/null && command -v ip >/dev/null; }; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    # iproute2: the UCX tests stand two hosts up as network namespaces joined by a veth pair
    { apt-get install -y -qq libucx-dev ucx-utils pkg-config iproute2 \
        || { apt-get update -qq && apt-get install -y -qq libucx-dev ucx-utils pkg-config iproute2; }; } \
      || echo "setup: WARNING: could not install libucx-dev; the UCX driver (ucx://) will be unavailable" >&2
  else
    echo "setup: WARNING: libucx-dev or iproute2 missing and not root: ucx:// or its namespace tests may be unavailable" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[dev]'
bash tools/install_pyverbs.sh "$VENV"
"$VENV/bin/python" -c "import grafos_fabric as gf; print('grafos-fabric', gf.__version__, 'ready')"

#!/usr/bin/env bash
# Make rdma-core's pyverbs importable from a virtual environment (the optional
# "verbs" extra of grafos-fabric).
#
# Usage: tools/install_pyverbs.sh VENV
#
# Why not PyPI: the `pyverbs` sdist there compiles rdma-core N and then links
# against the *system* libibverbs, so it only imports where the system ships
# exactly rdma-core N (Debian 12 ships 44.0: the import fails with
# "version `IBVERBS_PRIVATE_59' not found"). Debian's python3-pyverbs is built
# from the same rdma-core as the system libraries, for Debian's python3; it
# loads in any venv whose interpreter has the same ABI tag (cpython-3XY).
#
# What it does (idempotent; a second run changes nothing):
#   1. if VENV's python already imports pyverbs, it stops there;
#   2. installs python3-pyverbs rdma-core ibverbs-providers with apt-get
#      (apt-get update only when the packages are not known yet);
#   3. compares the ABI tag of Debian's pyverbs .so files with VENV's python
#      and says clearly when the Python versions differ;
#   4. links /usr/lib/python3/dist-packages/pyverbs into VENV's site-packages
#      (only that package: the rest of Debian's dist-packages stays out);
#   5. imports pyverbs's native modules with VENV's python, in a child process.
#
# pyverbs is optional: whenever it cannot be made to work this script prints a
# WARNING saying why and exits 0. It exits non-zero only for a usage error.
# Set GRAFOS_SKIP_PYVERBS=1 to skip it altogether.
set -uo pipefail

PACKAGES=(python3-pyverbs rdma-core ibverbs-providers)
# The modules the verbs driver uses; all of them load libibverbs.
MODULES="pyverbs.device, pyverbs.pd, pyverbs.mr, pyverbs.cq, pyverbs.qp, pyverbs.wr, pyverbs.addr"

say() { printf 'install_pyverbs: %s\n' "$*"; }
warn() {
    printf 'install_pyverbs: WARNING: %s\n' "$*" >&2
    printf 'install_pyverbs: WARNING: the verbs driver stays unavailable; everything else works without it.\n' >&2
    exit 0
}

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 VENV" >&2
    exit 2
fi
if [ "${GRAFOS_SKIP_PYVERBS:-0}" = "1" ]; then
    say "GRAFOS_SKIP_PYVERBS=1: skipped"
    exit 0
fi

VENV=$1
VPY="$VENV/bin/python"
[ -x "$VPY" ] || { echo "install_pyverbs: $VPY is not an executable python (is $VENV a venv?)" >&2; exit 2; }

import_check() {
    # Runs in a child process: a crash (two libpythons in one process) is a
    # failed check, not a crashed script.
    "$VPY" -c "import ${MODULES}; import pyverbs.device as d; print(d.__file__)" 2>&1
}

if out=$(import_check); then
    say "pyverbs already importable in $VENV ($out)"
    exit 0
fi

# -- 1. packages -------------------------------------------------------------
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
    warn "no apt-get/dpkg here: install rdma-core's pyverbs for $("$VPY" -V 2>&1) by hand"
fi

installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}
missing=()
for p in "${PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            SUDO=(sudo -n)
        else
            warn "not root and no password-less sudo: run 'apt-get install -y ${missing[*]}' as root, then rerun $0"
        fi
    fi
    export DEBIAN_FRONTEND=noninteractive
    # apt-get update only when apt does not know a candidate for every package.
    need_update=0
    for p in "${missing[@]}"; do
        cand=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')
        if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then need_update=1; fi
    done
    if [ $need_update -eq 1 ]; then
        say "apt-get update (package lists do not know ${missing[*]} yet)"
        "${SUDO[@]}" apt-get update -qq || warn "apt-get update failed"
    fi
    say "apt-get install -y --no-install-recommends ${missing[*]}"
    if ! "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        warn "apt-get install ${missing[*]} failed (is this Debian/Ubuntu with those packages?)"
    fi
fi

# -- 2. where Debian put pyverbs, and for which Python -----------------------
SRC=$(dpkg-query -L python3-pyverbs 2>/dev/null | grep -m1 '/pyverbs/__init__.py$' || true)
SRC=${SRC%/__init__.py}
[ -n "$SRC" ] && [ -d "$SRC" ] || warn "python3-pyverbs is installed but its pyverbs folder was not found"

# The ABI tag the .so files were built for, e.g. "cpython-311-x86_64-linux-gnu".
so=$(find "$SRC" -maxdepth 1 -name 'device.*.so' | head -n1)
[ -n "$so" ] || warn "no device.*.so in $SRC"
deb_tag=$(basename "$so"); deb_tag=${deb_tag#device.}; deb_tag=${deb_tag%.so}
venv_tag=$("$VPY" -c 'import sysconfig; print(sysconfig.get_config_var("SOABI"))')
venv_ver=$("$VPY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
deb_ver=$(printf '%s' "$deb_tag" | sed -n 's/^cpython-\([0-9]\)\([0-9]*\)-.*/\1.\2/p')
if [ "$deb_tag" != "$venv_tag" ]; then
    warn "Python version mismatch: Debian's python3-pyverbs is built for Python ${deb_ver:-?} ($deb_tag), but $VENV runs Python $venv_ver ($venv_tag). Use a Python ${deb_ver:-?} venv for the verbs driver, or build pyverbs from the rdma-core source that matches the system libibverbs."
fi
shared=$("$VPY" -c 'import sysconfig; print(sysconfig.get_config_var("Py_ENABLE_SHARED") or 0)')
if [ "$shared" != "1" ]; then
    say "note: $VPY is not a shared-libpython build; Debian's pyverbs links libpython$venv_ver.so and may load a second interpreter library (checked below)"
fi

# -- 3. link only the pyverbs package into the venv --------------------------
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("platlib"))')
DEST="$SITE/pyverbs"
if [ -e "$DEST" ] && [ ! -L "$DEST" ]; then
    warn "$DEST exists and is not a link (a PyPI pyverbs? it only works with exactly its own rdma-core): remove it with '$VPY -m pip uninstall pyverbs', then rerun $0"
fi
if [ "$(readlink "$DEST" 2>/dev/null)" != "$SRC" ]; then
    ln -sfn "$SRC" "$DEST" || warn "could not link $SRC into $SITE"
    say "linked $DEST -> $SRC"
fi

# -- 4. it must actually import ----------------------------------------------
if ! out=$(import_check); then
    rm -f "$DEST"
    warn "pyverbs does not import under $VPY (link removed): $(printf '%s' "$out" | tail -n 3)"
fi
say "pyverbs OK for Python $venv_ver: $out"
# Tell what the driver will see (never fails the script).
"$VPY" -c 'from grafos_fabric.drivers._verbs_compat import probe; r = probe(); print("install_pyverbs: RDMA device:", "available" if r is None else "none (" + r + ")")' 2>/dev/null || true
exit 0

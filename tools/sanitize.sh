#!/usr/bin/env bash
# The native ring under AddressSanitizer and UndefinedBehaviorSanitizer.
#
#   bash tools/sanitize.sh [pytest args...]
#
# 1. builds grafos_fabric._native (and _item) with -fsanitize=address,undefined into
#    build/sanitize/ (the normal build in grafos_fabric/ is left alone),
# 2. lays out an overlay package there (the Python sources by symlink, the
#    sanitized module as a file) and puts it first on PYTHONPATH,
# 3. runs the native-facing tests (ring white-box, ring core, queue, one-sided, and the
#    hostile-memory fuzzer at a reduced count, the producer lock) with libasan preloaded into the
#    Python host, leaks off (CPython's own allocations are not ours), and every
#    UBSan finding fatal,
# 4. fails on a failed test or on any sanitizer report (reports also go to
#    log files, so one from a worker subprocess whose stderr a test captured
#    is not lost).
# Needs the venv from tools/setup.sh and gcc's libasan/libubsan.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
OUT=$ROOT/build/sanitize
SANITIZERS=${SANITIZERS:-address,undefined}

LIBASAN=$(gcc -print-file-name=libasan.so)
if [ ! -e "$LIBASAN" ]; then
  echo "sanitize: gcc has no libasan.so (install the gcc sanitizer runtimes, e.g. libasan8/libubsan1)" >&2
  exit 1
fi

rm -rf "$OUT"
mkdir -p "$OUT/src/native" "$OUT/overlay/grafos_fabric" "$OUT/logs"

# -- 1. build (in a scratch folder: the build writes its objects under its cwd)
cp native/*.c native/*.h native/build_native.py "$OUT/src/native/"
(cd "$OUT/src" && GRAFOS_NATIVE_SANITIZE=$SANITIZERS "$PY" native/build_native.py >"$OUT/build.log" 2>&1) || {
  tail -30 "$OUT/build.log" >&2
  echo "sanitize: build failed (log: $OUT/build.log)" >&2
  exit 1
}
SO=$(find "$OUT/src" -name '_native*.so' | head -1)
[ -n "$SO" ] || { echo "sanitize: the build made no module" >&2; exit 1; }

# -- 2. overlay package: the sources as they are, the sanitized module
# (grafos_fabric/drivers and grafos_fabric/tools are links to drivers/ and tools/: linked like the rest)
for f in grafos_fabric/*; do
  case "$f" in *.so | */__pycache__) continue ;; esac
  ln -s "$ROOT/$f" "$OUT/overlay/grafos_fabric/$(basename "$f")"
done
cp "$SO" "$OUT/overlay/grafos_fabric/"
# grafos_fabric._item (native/gf_item.c: the item type's buffer protocol; gf_ckpt.c and gf_crc.c:
# checkpoint() in C), sanitized the same way
# (gf_native.c's ring core is gf_ring_core.h's inline functions, found through -Inative: gf_ring_core.c
# only exports them to cffi, so _item needs no other source)
PYINC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
NPINC=$("$PY" -c 'import numpy; print(numpy.get_include())')  # gf_item.c makes reservation views with numpy's C API
gcc -shared -fPIC -O1 -g -fno-omit-frame-pointer -fsanitize="$SANITIZERS" -std=gnu11 -I"$PYINC" -I"$NPINC" \
  -DPy_LIMITED_API=0x030B0000 -DNPY_TARGET_VERSION=NPY_1_24_API_VERSION -Inative native/gf_item.c native/gf_native.c native/gf_ckpt.c native/gf_crc.c \
  -o "$OUT/overlay/grafos_fabric/_item.abi3.so" 2>"$OUT/build_item.log" || {
  cat "$OUT/build_item.log" >&2
  echo "sanitize: building _item failed" >&2
  exit 1
}

export PYTHONPATH="$OUT/overlay${PYTHONPATH:+:$PYTHONPATH}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$OUT/logs/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$OUT/logs/ubsan"
export GRAFOS_FUZZ_CORRUPTIONS=${GRAFOS_FUZZ_CORRUPTIONS:-1500}
export GRAFOS_FUZZ_ROUNDS=${GRAFOS_FUZZ_ROUNDS:-6}

# Python puts its cwd first on sys.path: run from the overlay, so that the
# repository's own grafos_fabric/ (with the normal module) is not what loads
cd "$OUT/overlay"
LD_PRELOAD="$LIBASAN" "$PY" - <<'EOF'
import grafos_fabric._native as n, grafos_fabric._item as i, sys
print("sanitize: using", n.__file__, i.__file__)
ok = all("/build/sanitize/overlay/" in m.__file__ for m in (n, i))
sys.exit(0 if ok else "sanitize: the normal build was imported")
EOF

# -- 3. the native-facing tests
status=0
# the conformance files on the shm driver only (its every access pair): the other drivers'
# native code (UCX, pyverbs) is not what this run is about
GRAFOS_CONFORMANCE_DRIVERS=shm LD_PRELOAD="$LIBASAN" "$PY" -m pytest -q -p no:cacheprovider -p no:randomly \
  --rootdir="$ROOT" -c "$ROOT/pyproject.toml" "$ROOT/tests/whitebox/test_ring_whitebox.py" \
  "$ROOT/tests/whitebox/test_onesided_ring.py" "$ROOT/tests/whitebox/test_ring_core.py" \
  "$ROOT/tests/conformance/test_queue.py" \
  "$ROOT/tests/conformance/test_queue_model.py" "$ROOT/tests/conformance/test_queue_paths.py" \
  "$ROOT/tests/test_hostile_memory.py" "$ROOT/tests/test_block_durable.py" \
  "$ROOT/tests/conformance/test_item_buffer.py" "$ROOT/tests/conformance/test_queue_fast.py" \
  "$ROOT/tests/whitebox/test_plock.py" "$ROOT/tests/whitebox/test_wake_once.py" \
  "$ROOT/tests/test_checkpoint_lane.py" "$ROOT/tests/test_checkpoint_native.py" "$@" || status=$?
cd "$ROOT"

# -- 4. any report fails the run
if compgen -G "$OUT/logs/*" >/dev/null; then
  echo "sanitize: sanitizer reports:" >&2
  for f in "$OUT"/logs/*; do echo "== $f" >&2; head -60 "$f" >&2; done
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "sanitize: tests failed under the sanitizers (exit $status)" >&2
  exit "$status"
fi
echo "sanitize: no AddressSanitizer or UBSan reports ($SANITIZERS)"

#!/usr/bin/env bash
# Build the sdist and the wheel, install the sdist into a fresh virtual
# environment (with its [test] extra), unpack the sdist and run pytest there
# against the installed package (not the checkout). What it proves: the sdist
# builds the native module from its own sources, and carries the tests, their
# helpers, the examples and the scripts the README names.
#
#   bash tools/check_sdist.sh [PYTEST ARGS...]     (default: -m "not stress" -q)
#
# Environment: PYTHON (default python3), WORK (default: a temporary directory,
# removed afterwards unless KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d -t grafos-sdist.XXXXXX)}
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
if [ "$#" -eq 0 ]; then set -- -m "not stress" -q -p no:randomly; fi

echo "== build sdist and wheel into $WORK/dist"
"$PYTHON" -m venv "$WORK/build-env"
"$WORK/build-env/bin/python" -m pip install -q build
"$WORK/build-env/bin/python" -m build -o "$WORK/dist" . >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
sdist=$(ls "$WORK"/dist/*.tar.gz)
wheel=$(ls "$WORK"/dist/*.whl)
echo "sdist: $(basename "$sdist")"
echo "wheel: $(basename "$wheel")"
case "$wheel" in
  *-cp311-abi3-*.whl) ;;
  *) echo "check_sdist: the wheel is not tagged cp311-abi3: $wheel" >&2; exit 1 ;;
esac

echo "== install the sdist (built from source) into a fresh venv"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "${sdist}[test,bench,prometheus]"
# from $WORK: run from the checkout, its grafos_fabric/ folder would shadow the installed package
(cd "$WORK" && "$WORK/venv/bin/python" - <<'EOF'
import importlib.util, grafos_fabric, grafos_fabric._native as n, grafos_fabric._item as i
print("installed:", grafos_fabric.__file__)
print("native:", n.__file__, i.__file__)
assert n.__file__.endswith(".abi3.so"), n.__file__
assert i.__file__.endswith(".abi3.so"), i.__file__
assert "site-packages" in grafos_fabric.__file__
EOF
)

echo "== pytest from the unpacked sdist: $*"
mkdir -p "$WORK/src"
tar -xzf "$sdist" -C "$WORK/src"
src=$(ls -d "$WORK"/src/grafos_fabric-*)
for need in LICENSE README.md tests/conftest.py tests/_pipeline_workers.py examples/pipeline_demo.py tools/setup.sh native/gf_native.c; do
  [ -e "$src/$need" ] || { echo "check_sdist: the sdist lacks $need" >&2; exit 1; }
done
# The tests run against the installed package. The unpacked source package (no
# compiled module) would shadow it for every `python -c`/`python -m` a test starts
# in this folder: set it aside.
mv "$src/grafos_fabric" "$WORK/grafos_fabric.src"
cd "$src"
"$WORK/venv/bin/pytest" -p no:cacheprovider "$@"

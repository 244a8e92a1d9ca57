"""cffi build script (out-of-line API mode) for grafos_fabric._native.

Build-only: this folder is not installed. ``pip install .`` and
``pip install -e .`` run it through setuptools' ``cffi_modules``.

``GRAFOS_NATIVE_SANITIZE`` (e.g. ``address,undefined``) builds with those
sanitizers, for tools/sanitize.sh, which builds such a copy apart from the
normal one (never set it for an install: the module then needs libasan
preloaded into the Python process).
"""

from __future__ import annotations

import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
# setuptools refuses absolute source paths: name them relative to the build's cwd.
REL = os.path.relpath(HERE, os.getcwd())

SANITIZE = os.environ.get("GRAFOS_NATIVE_SANITIZE", "")
CFLAGS = ["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fno-strict-aliasing"]
LDFLAGS: list[str] = []
if SANITIZE:
    san = [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]
    CFLAGS = [*CFLAGS[1:], "-O1", "-g", *san]
    LDFLAGS = san


def cdef_text() -> str:
    """What ffi.cdef gets: the constants and types (gf_cdef.h, where "..."
    takes every value and layout from the real headers), then the function
    prototypes from gf_native_api.h, the very header the C code includes
    (one copy of every prototype). cdef takes no preprocessor lines: the
    prototype header has none, and this refuses one that grows any."""
    api = (HERE / "gf_native_api.h").read_text()
    if any(line.lstrip().startswith("#") for line in api.splitlines()):
        raise SystemExit("native/gf_native_api.h must stay plain declarations (ffi.cdef takes no # lines)")
    return (HERE / "gf_cdef.h").read_text() + "\n" + api


ffibuilder = FFI()
ffibuilder.cdef(cdef_text())
ffibuilder.set_source(
    "grafos_fabric._native",
    '#include "gf_native.h"\n#include "gf_msgpack.h"\n#include "gf_crc.h"\n',
    sources=[os.path.join(REL, n) for n in ("gf_native.c", "gf_ring_core.c", "gf_msgpack.c", "gf_crc.c")],
    include_dirs=[REL],
    depends=[
        os.path.join(REL, n)
        for n in (
            "gf_native.h",
            "gf_native_api.h",
            "gf_cdef.h",
            "gf_ring_core.h",
            "gf_atomics.h",
            "gf_segment.h",
            "gf_ring.h",
            "gf_msgpack.h",
            "gf_crc.h",
        )
    ],
    py_limited_api=True,  # stable ABI: grafos_fabric/_native.abi3.so, wheel tag cp311-abi3 (setup.py)
    extra_compile_args=CFLAGS,
    extra_link_args=LDFLAGS,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

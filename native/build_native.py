"""cffi build script (out-of-line API mode) for grafos_fabric._native.

Build-only: this folder is not installed. ``pip install .`` and
``pip install -e .`` run it through setuptools' ``cffi_modules``.
"""

from __future__ import annotations

import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
# setuptools refuses absolute source paths: name them relative to the build's cwd.
REL = os.path.relpath(HERE, os.getcwd())

ffibuilder = FFI()
ffibuilder.cdef((HERE / "gf_cdef.h").read_text())
ffibuilder.set_source(
    "grafos_fabric._native",
    '#include "gf_native.h"\n#include "gf_msgpack.h"\n',
    sources=[os.path.join(REL, "gf_native.c"), os.path.join(REL, "gf_msgpack.c")],
    include_dirs=[REL],
    depends=[
        os.path.join(REL, n) for n in ("gf_native.h", "gf_atomics.h", "gf_segment.h", "gf_ring.h", "gf_msgpack.h")
    ],
    py_limited_api=True,  # stable ABI: grafos_fabric/_native.abi3.so, wheel tag cp310-abi3 (setup.py)
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-fno-strict-aliasing"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

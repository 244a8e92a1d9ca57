"""Only the native build lives here; all metadata is in pyproject.toml.

The UCX binding (grafos_fabric._ucx) is built only where UCX's headers are
found (native/build_ucx.py says how it looks); elsewhere it is skipped with a
message and ``ucx://`` raises ``Unsupported``.
"""

import runpy

import numpy
from setuptools import Extension, setup

modules = ["native/build_native.py:ffibuilder"]
if runpy.run_path("native/build_ucx.py")["ffibuilder"] is not None:
    modules.append("native/build_ucx.py:ffibuilder")

# Every native module uses only the stable ABI: the cffi ones (py_limited_api=True in
# their build scripts) and grafos_fabric._item, the C base of a popped item, which is
# built against the limited API of 3.11 (Py_LIMITED_API 0x030B0000 in native/gf_item.c:
# the buffer-protocol slots are in the limited API from 3.11). One wheel, tagged
# cp311-abi3, serves CPython 3.11 and every later version.
setup(
    cffi_modules=modules,
    ext_modules=[
        Extension(
            "grafos_fabric._item",
            # gf_native.c too: items release their ring space with a direct native call; gf_ckpt.c
            # and gf_crc.c: checkpoint() in C, which calls gf_lane_write directly
            sources=["native/gf_item.c", "native/gf_native.c", "native/gf_ckpt.c", "native/gf_crc.c"],
            # numpy's headers: a reservation's view is made with numpy's C API (its function
            # table, fetched at import). Built against numpy >= 2 (pyproject's build requirement)
            # for numpy 1.24 and later (NPY_TARGET_VERSION: pyproject's runtime floor).
            include_dirs=["native", numpy.get_include()],
            depends=[
                "native/gf_native.h",
                "native/gf_native_api.h",
                "native/gf_ring_core.h",  # the ring core's inline functions, which gf_native.c calls
                "native/gf_atomics.h",
                "native/gf_segment.h",
                "native/gf_ring.h",
                "native/gf_item.h",
                "native/gf_crc.h",
            ],
            py_limited_api=True,
            define_macros=[("Py_LIMITED_API", "0x030B0000"), ("NPY_TARGET_VERSION", "NPY_1_24_API_VERSION")],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
        )
    ],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)

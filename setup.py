"""Only the native builds live here; all metadata is in pyproject.toml.

* ``grafos_fabric._native``: the ring, built by cffi (``native/build_native.py``).
* ``grafos_fabric._item``: the single-item hot path, a small CPython extension
  (``native/gf_item.c``; a normal build for the running interpreter, not abi3).
"""

from setuptools import Extension, setup

_HEADERS = ["native/gf_native.h", "native/gf_atomics.h", "native/gf_segment.h", "native/gf_ring.h"]

# The cffi module uses only the stable ABI (py_limited_api=True in its build script).
# grafos_fabric._item does not (the buffer protocol is in the limited API only from
# 3.11, and its hot path uses the full API): a wheel that holds it is really
# per-interpreter, whatever bdist_wheel's py_limited_api tag below claims. See the
# speed branch's report: either this tag goes, or _item moves to the 3.11 limited API.
setup(
    cffi_modules=["native/build_native.py:ffibuilder"],
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    ext_modules=[
        Extension(
            "grafos_fabric._item",
            sources=["native/gf_item.c"],
            include_dirs=["native"],
            depends=_HEADERS,
            extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-fno-strict-aliasing"],
        )
    ],
)

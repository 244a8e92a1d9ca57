"""Only the native build lives here; all metadata is in pyproject.toml.

The UCX binding (grafos_fabric._ucx) is built only where UCX's headers are
found (native/build_ucx.py says how it looks); elsewhere it is skipped with a
message and ``ucx://`` raises ``Unsupported``.
"""

import runpy

from setuptools import setup

modules = ["native/build_native.py:ffibuilder"]
if runpy.run_path("native/build_ucx.py")["ffibuilder"] is not None:
    modules.append("native/build_ucx.py:ffibuilder")

# The native modules use only the stable ABI (cffi, py_limited_api=True in the build
# scripts): one wheel, tagged cp310-abi3, serves CPython 3.10 and every later version.
setup(
    cffi_modules=modules,
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)

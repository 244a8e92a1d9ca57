"""Only the native build lives here; all metadata is in pyproject.toml."""

from setuptools import setup

# The native module uses only the stable ABI (cffi, py_limited_api=True in the build
# script): one wheel, tagged cp310-abi3, serves CPython 3.10 and every later version.
setup(
    cffi_modules=["native/build_native.py:ffibuilder"],
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)

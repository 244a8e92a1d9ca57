"""cffi build script (out-of-line API mode) for grafos_fabric._ucx, the UCX driver's binding.

Build-only, like build_native.py. UCX is optional: the headers are looked for
with ``$UCX_PREFIX`` when set, else ``pkg-config ucx`` (e.g. the PyPI wheel
``libucx-cu12``: ``UCX_PREFIX=$(python -c 'import libucx, os;
print(os.path.dirname(libucx.__file__))')``). Where neither has
``ucp/api/ucp.h``, :data:`ffibuilder` is ``None`` with a message on stderr,
and setup.py builds everything else (``open_fabric("ucx://...")`` then raises
``Unsupported``).
"""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
REL = os.path.relpath(HERE, os.getcwd())


def _pkg_config() -> tuple[list[str], list[str], list[str]] | None:
    try:
        cflags = subprocess.run(["pkg-config", "--cflags", "ucx"], capture_output=True, text=True, check=True).stdout
        libs = subprocess.run(["pkg-config", "--libs-only-L", "ucx"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    incs = [f[2:] for f in shlex.split(cflags) if f.startswith("-I")]
    libdirs = [f[2:] for f in shlex.split(libs) if f.startswith("-L")]
    if not any(pathlib.Path(d, "ucp/api/ucp.h").exists() for d in [*incs, "/usr/include"]):
        return None
    return incs, libdirs, []


def _prefix() -> tuple[list[str], list[str], list[str]] | None:
    prefix = os.environ.get("UCX_PREFIX")
    if not prefix:
        return None
    inc = pathlib.Path(prefix, "include")
    if not (inc / "ucp/api/ucp.h").exists():
        return None
    libdirs = [str(p) for p in (pathlib.Path(prefix, "lib"), pathlib.Path(prefix, "lib64")) if p.is_dir()]
    return [str(inc)], libdirs, libdirs  # rpath: the wheel's libraries are not on the loader path


def find_ucx() -> tuple[list[str], list[str], list[str]] | None:
    """``(include_dirs, library_dirs, rpaths)`` of a UCX install, or ``None``.

    An explicit ``$UCX_PREFIX`` wins (so one machine can build against the
    PyPI wheel's UCX although Debian's is installed too), then ``pkg-config``."""
    return _prefix() or _pkg_config()


def cdef_text() -> str:
    """What ffi.cdef gets: gf_ucx_api.h, the very header gf_ucx.c includes (status codes as an
    enum, opaque handle types, prototypes), so nothing is typed twice. cdef takes no
    preprocessor lines: the header has none, and this refuses one that grows any."""
    api = (HERE / "gf_ucx_api.h").read_text()
    if any(line.lstrip().startswith("#") for line in api.splitlines()):
        raise SystemExit("native/gf_ucx_api.h must stay plain declarations (ffi.cdef takes no # lines)")
    return api


def make_builder() -> FFI | None:
    found = find_ucx()
    if found is None:
        print("grafos-fabric: UCX headers (ucp/api/ucp.h) not found by pkg-config ucx or under $UCX_PREFIX: "
              "building without the UCX driver (ucx:// raises Unsupported)", file=sys.stderr)
        return None
    incs, libdirs, rpaths = found
    builder = FFI()
    builder.cdef(cdef_text())
    builder.set_source(
        "grafos_fabric._ucx",
        '#include "gf_ucx.h"\n',
        sources=[os.path.join(REL, "gf_ucx.c")],
        include_dirs=[REL, *incs],
        library_dirs=libdirs,
        libraries=["ucp", "uct", "ucs"],
        extra_link_args=[f"-Wl,-rpath,{d}" for d in rpaths],
        depends=[os.path.join(REL, n) for n in ("gf_ucx.h", "gf_ucx_api.h")],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        py_limited_api=True,  # stable ABI, like _native (setup.py tags the wheel cp311-abi3)
    )
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    if ffibuilder is None:
        sys.exit(1)
    ffibuilder.compile(verbose=True)

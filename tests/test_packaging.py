"""Packaging: abi3 native module and wheel tag, optional extras, a complete sdist, LICENSE."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import grafos_fabric as gf

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomllib (3.11+) or tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"


def _pyproject() -> dict:
    if not PYPROJECT.exists():
        pytest.skip("pyproject.toml is not next to tests/ (installed without the sources)")
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def test_the_native_modules_use_the_stable_abi() -> None:
    from grafos_fabric import _item, _native

    assert _native.__file__.endswith(".abi3.so"), _native.__file__
    assert _item.__file__.endswith(".abi3.so"), _item.__file__  # the limited API of 3.11 (native/gf_item.c)


def test_requires_python_matches_the_limited_api_the_item_type_is_built_for() -> None:
    assert _pyproject()["project"]["requires-python"] == ">=3.11"
    setup_py = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert '"py_limited_api": "cp311"' in setup_py and '("Py_LIMITED_API", "0x030B0000")' in setup_py


def test_rich_matplotlib_and_prometheus_client_are_extras_not_dependencies() -> None:
    project = _pyproject()["project"]
    deps = " ".join(project["dependencies"])
    for name in ("rich", "matplotlib", "prometheus"):
        assert name not in deps
    extras = project["optional-dependencies"]
    assert any(d.startswith("rich") for d in extras["cli"])
    assert {"rich", "matplotlib"} <= {d.split(">")[0].split("=")[0] for d in extras["bench"]}
    assert any(d.startswith("prometheus-client") for d in extras["prometheus"])
    assert "cli" in extras["dev"][0] and "bench" in extras["dev"][0] and "test" in extras["dev"][0]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]


def test_the_library_and_the_tools_import_without_the_extras() -> None:
    code = (
        "import sys\n"
        "for m in ('rich', 'matplotlib', 'prometheus_client'):\n"
        "    sys.modules[m] = None\n"
        "import grafos_fabric, grafos_fabric.observe, grafos_fabric.pipeline, grafos_fabric.checkpoint\n"
        "import grafos_fabric.drivers.shm, grafos_fabric.tools.cli, grafos_fabric.tools.bench\n"
        "from grafos_fabric.tools import bench, cli\n"
        "assert bench.main(['--sizes', '64']) == 3\n"
        "assert cli.main(['ls', '--fabric', 'shm://nothing-here-x']) == 3\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert "pip install 'grafos-fabric[bench]'" in proc.stderr
    assert "pip install 'grafos-fabric[cli]'" in proc.stderr


def test_the_license_file_is_the_apache_2_text() -> None:
    lic = ROOT / "LICENSE"
    if not lic.exists():
        pytest.skip("LICENSE is not next to tests/ (installed without the sources)")
    text = lic.read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text


@pytest.mark.stress
def test_sdist_is_complete_and_the_wheel_is_tagged_abi3(tmp_path: Path) -> None:
    """Builds both (about half a minute): the sdist has what pytest needs, the wheel is cp311-abi3."""
    _pyproject()
    pytest.importorskip("build", reason="the 'build' package is not installed (it is in the [dev] extra)")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "-o", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    if proc.returncode != 0 and "Could not find a version that satisfies" in proc.stderr + proc.stdout:
        pytest.skip("the isolated build environment cannot be installed here (no package index)")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (sdist,) = tmp_path.glob("*.tar.gz")
    (wheel,) = tmp_path.glob("*.whl")
    assert wheel.name == f"grafos_fabric-{gf.__version__}-cp311-abi3-linux_{os.uname().machine}.whl"
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for need in (
        "LICENSE",
        "README.md",
        "tests/conftest.py",
        "tests/_pipeline_workers.py",
        "tests/_blockdev.py",
        "tests/test_readme.py",
        "examples/pipeline_demo.py",
        "tools/setup.sh",
        "tools/check_sdist.sh",
        "tools/record_pattern.c",  # built by tests/test_record_pattern.py
        "tools/checkpoint_floor.c",  # and by tests/test_checkpoint_floor.py
        "native/gf_native.c",
        "native/gf_item.c",
        "native/gf_ckpt.c",
        "native/gf_item.h",
        "native/build_native.py",
        "drivers/shm.py",
        "tools/cli.py",
    ):
        assert need in names, f"the sdist lacks {need}"
    assert not any(n.endswith(".so") for n in names)
    with zipfile.ZipFile(wheel) as zf:
        wnames = set(zf.namelist())
    assert "grafos_fabric/_native.abi3.so" in wnames and "grafos_fabric/py.typed" in wnames
    assert "grafos_fabric/_item.abi3.so" in wnames
    assert "grafos_fabric/drivers/shm.py" in wnames and "grafos_fabric/tools/cli.py" in wnames
    assert "grafos_fabric/drivers/ucx/region.py" in wnames
    assert any(n.endswith("licenses/LICENSE") for n in wnames)
    assert not any(n.endswith(".sh") for n in wnames)


def test_every_package_folder_is_listed_for_the_wheel() -> None:
    """pyproject lists the packages by name (no find): a folder with an __init__.py that is not listed
    would work from the checkout and an editable install but be missing from the wheel."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for top, name in ((ROOT / "grafos_fabric", "grafos_fabric"), (ROOT / "drivers", "grafos_fabric.drivers"),
                      (ROOT / "tools", "grafos_fabric.tools")):
        for init in top.rglob("__init__.py"):
            rel = init.parent.relative_to(top)
            if any(part in ("drivers", "tools") for part in rel.parts[:1]) and top.name == "grafos_fabric":
                continue  # the links: counted under their own folders
            found.add(".".join([name, *rel.parts]))
    assert found - listed == set(), f"package folders missing from pyproject's packages: {sorted(found - listed)}"


def test_the_source_tree_is_the_import_tree():
    """grafos_fabric/drivers and grafos_fabric/tools are links to the top-level folders (README "Layout"):
    no package-dir mapping, and mypy checks the package under its one import name."""
    cfg = _pyproject()
    assert "package-dir" not in cfg["tool"]["setuptools"]
    assert cfg["tool"]["mypy"]["files"] == ["grafos_fabric"]
    for sub in ("drivers", "tools"):
        link = ROOT / "grafos_fabric" / sub
        if not link.is_symlink():
            pytest.skip("an unpacked sdist: the links are plain folders there")
        assert os.readlink(link) == f"../{sub}"
    if Path(gf.__file__).resolve().parent != ROOT / "grafos_fabric":
        pytest.skip(f"grafos_fabric is installed from elsewhere ({gf.__file__}), not this checkout")
    import grafos_fabric.drivers.shm as shm
    import grafos_fabric.tools.cli as cli

    assert Path(shm.__file__).resolve() == ROOT / "drivers" / "shm.py"
    assert Path(cli.__file__).resolve() == ROOT / "tools" / "cli.py"

"""``grafos-fabric serve`` and ``tools/install_pyverbs.sh`` without a device."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grafos_fabric.drivers import _verbs_compat as compat
from grafos_fabric.tools import serve

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "tools" / "install_pyverbs.sh"


# ---------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("512K", 512 << 10), ("256M", 256 << 20), ("4g", 4 << 30), ("1GiB", 1 << 30), ("2MB", 2 << 20)],
)
def test_pool_sizes_parse_with_binary_units(text, value):
    assert serve.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "0", "-1M", "12X", "1.5G", "M"])
def test_nonsense_pool_sizes_are_argument_errors(text):
    with pytest.raises(argparse.ArgumentTypeError):
        serve.parse_size(text)


def test_serve_and_bench_share_one_size_parser():
    from grafos_fabric.tools import _units, bench

    assert serve.parse_size is _units.parse_size and bench.parse_size is _units.parse_size
    assert [_units.parse_size(s) for s in ("2b", "4KB", "1 MiB", "1T")] == [2, 4096, 1 << 20, 1 << 40]


def test_add_serve_parser_registers_serve_with_run_serve_and_defaults():
    parser = argparse.ArgumentParser(prog="grafos-fabric")
    sub = parser.add_subparsers(dest="command")
    serve.add_serve_parser(sub)
    args = parser.parse_args(["serve", "--device", "mlx5_1", "--port", "9000", "--pool", "1G"])
    assert (args.command, args.device, args.port, args.pool) == ("serve", "mlx5_1", 9000, 1 << 30)
    assert args.func is serve.run_serve
    defaults = parser.parse_args(["serve"])
    assert (defaults.device, defaults.port, defaults.pool, defaults.gid_index) == (None, 18515, 256 << 20, 0)


def test_serve_with_a_bad_port_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        serve.serve_main(["--port", "70000"])
    assert info.value.code == 2
    assert "port out of range" in capsys.readouterr().err


def test_serve_without_a_device_exits_unavailable_with_the_probe_reason(capsys, tmp_path):
    reason = compat.probe()
    if reason is None:
        pytest.skip("an RDMA device exists here")
    token = str(tmp_path / "node.token")
    assert serve.serve_main(["--port", "0", "--pool", "1M", "--token-file", token]) == serve.EX_UNAVAILABLE
    assert capsys.readouterr().err == f"grafos-fabric serve: no RDMA device: {reason}\n"


def test_serve_without_a_token_file_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.delenv("GRAFOS_TOKEN_FILE", raising=False)
    assert serve.serve_main(["--driver", "nodeshm", "--port", "0", "--pool", "1M"]) == 2
    assert "--token-file" in capsys.readouterr().err


def test_serve_asks_the_probe_about_the_named_device(monkeypatch, capsys, tmp_path):
    asked: list[str | None] = []

    def fake_probe(device: str | None = None) -> str | None:
        asked.append(device)
        return f"device {device!r} not found"

    monkeypatch.setattr(compat, "probe", fake_probe)
    token = str(tmp_path / "node.token")
    assert serve.serve_main(["--device", "mlx5_7", "--pool", "1M", "--token-file", token]) == serve.EX_UNAVAILABLE
    assert asked == ["mlx5_7"]
    assert "no RDMA device: device 'mlx5_7' not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# install_pyverbs.sh
# ---------------------------------------------------------------------------


def run_install(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_install_script_without_a_venv_argument_is_a_usage_error():
    r = run_install()
    assert r.returncode == 2
    assert "usage:" in r.stderr


def test_install_script_refuses_a_folder_that_is_not_a_venv(tmp_path):
    r = run_install(str(tmp_path))
    assert r.returncode == 2
    assert "is not an executable python" in r.stderr


def test_install_script_can_be_skipped(tmp_path):
    r = run_install(str(tmp_path), env={"GRAFOS_SKIP_PYVERBS": "1"})
    assert r.returncode == 0
    assert "skipped" in r.stdout


def test_install_script_is_a_no_op_when_pyverbs_already_imports():
    if compat.pyverbs_import_error() is not None:
        pytest.skip(f"pyverbs is not set up in this venv: {compat.pyverbs_import_error()}")
    r = run_install(sys.prefix)
    assert r.returncode == 0, r.stderr
    assert "already importable" in r.stdout


def _deb_installed(pkg: str) -> bool:
    if shutil.which("dpkg-query") is None:
        return False
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return r.stdout == "install ok installed"


def test_install_script_explains_a_python_version_mismatch_and_still_exits_0(tmp_path):
    if not all(_deb_installed(p) for p in ("python3-pyverbs", "rdma-core", "ibverbs-providers")):
        pytest.skip("needs Debian's python3-pyverbs installed (this test must not run apt)")
    sos = list(Path("/usr/lib/python3/dist-packages/pyverbs").glob("device.*.so"))
    if not sos:
        pytest.skip("Debian's pyverbs is not in /usr/lib/python3/dist-packages")
    deb_tag = sos[0].name.removeprefix("device.").removesuffix(".so")  # e.g. cpython-311-x86_64-linux-gnu
    deb_ver = f"{deb_tag[8]}.{deb_tag[9:].split('-')[0]}"
    site = tmp_path / "site-packages"
    site.mkdir()
    fake = tmp_path / "venv" / "bin"
    fake.mkdir(parents=True)
    # A "python 3.99" whose imports fail: what a venv of another minor version looks like.
    (fake / "python").write_text(
        "#!/bin/bash\n"
        'case "$*" in\n'
        "  *SOABI*) echo cpython-399-x86_64-linux-gnu ;;\n"
        "  *version_info*) echo 3.99 ;;\n"
        "  *Py_ENABLE_SHARED*) echo 1 ;;\n"
        f"  *platlib*) echo {site} ;;\n"
        "  *) echo 'ModuleNotFoundError: No module named pyverbs' >&2; exit 1 ;;\n"
        "esac\n"
    )
    (fake / "python").chmod(0o755)
    r = run_install(str(tmp_path / "venv"))
    assert r.returncode == 0, r.stderr
    assert "Python version mismatch" in r.stderr
    assert f"built for Python {deb_ver} ({deb_tag})" in r.stderr
    assert "runs Python 3.99 (cpython-399-x86_64-linux-gnu)" in r.stderr
    assert "the verbs driver stays unavailable" in r.stderr
    assert list(site.iterdir()) == []

"""The block driver: O_DIRECT block leases on regular files and on real (loop) block devices."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from grafos_fabric.drivers import block as blockmod
from grafos_fabric.drivers.block import BlockRegion, BlockStore, default_block_dir, filesystem_type, open_block
from grafos_fabric.errors import (
    CapacityExceeded,
    Corrupted,
    Disconnected,
    FabricValueError,
    LeaseExpired,
    Misaligned,
    Revoked,
)
from grafos_fabric.lease import ManualClock

try:
    from _blockdev import loop_device, open_kind, reopen
except ImportError:  # tests/ imported as a package
    from tests._blockdev import loop_device, open_kind, reopen

SIZE = 256 * 1024


@pytest.fixture(params=["file", pytest.param("loop", marks=pytest.mark.blockdev)])
def region(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockRegion]:
    with contextlib.ExitStack() as stack:
        yield open_kind(request.param, tmp_path, SIZE, stack)


def pattern(nbytes: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(nbytes))


# -- geometry ------------------------------------------------------------------


@pytest.mark.blockdev
def test_loop_device_block_size_and_size_come_from_the_device(tmp_path: Path) -> None:
    with loop_device(tmp_path / "a.img", SIZE) as dev, open_block(dev) as region:
        assert region.is_blockdev
        assert region.block_size == 512
        assert region.nbytes == SIZE
        assert region.nblocks == SIZE // 512
        assert region.direct


@pytest.mark.blockdev
def test_loop_device_with_4k_sectors_reports_4096_byte_blocks(tmp_path: Path) -> None:
    with loop_device(tmp_path / "b.img", SIZE, sector_size=4096) as dev, open_block(dev) as region:
        assert region.block_size == 4096
        assert region.nblocks == SIZE // 4096
        region.write_blocks(3, pattern(4096, 1))
        region.sync()
        assert region.read_blocks(3) == pattern(4096, 1)


@pytest.mark.blockdev
def test_block_device_refuses_a_block_size_other_than_its_own(tmp_path: Path) -> None:
    with loop_device(tmp_path / "c.img", SIZE) as dev, pytest.raises(FabricValueError):
        open_block(dev, block_size=4096)


def test_regular_file_uses_the_filesystem_block_size(tmp_path: Path) -> None:
    with open_block(tmp_path / "f.img", create_size=SIZE) as region:
        expected = os.statvfs(tmp_path).f_bsize
        assert region.block_size == (expected if blockmod._is_block_size(expected) else 4096)
        assert not region.is_blockdev
        assert region.nblocks == SIZE // region.block_size


def test_regular_file_block_size_can_be_overridden_to_512(tmp_path: Path) -> None:
    with open_block(tmp_path / "f.img", create_size=SIZE, block_size=512) as region:
        assert region.block_size == 512
        region.write_blocks(1, pattern(512, 9))
        assert region.read_blocks(1) == pattern(512, 9)


@pytest.mark.parametrize("bad", [0, 100, 768, 1 << 17, "4096"])
def test_block_size_override_must_be_a_power_of_two_in_range(tmp_path: Path, bad: object) -> None:
    with pytest.raises(FabricValueError):
        open_block(tmp_path / "f.img", create_size=SIZE, block_size=bad)


# -- data ----------------------------------------------------------------------


def test_written_blocks_read_back_identical(region: BlockRegion) -> None:
    bs = region.block_size
    region.write_blocks(2, pattern(3 * bs, 7))
    region.sync()
    assert region.read_blocks(2, 3) == pattern(3 * bs, 7)
    assert region.read_blocks(1) == bytes(bs)


def test_read_into_fills_a_caller_buffer(region: BlockRegion) -> None:
    bs = region.block_size
    region.write_blocks(0, pattern(2 * bs, 3))
    out = bytearray(2 * bs)
    region.read_into(0, out)
    assert bytes(out) == pattern(2 * bs, 3)


def test_read_into_refuses_a_read_only_buffer(region: BlockRegion) -> None:
    with pytest.raises(FabricValueError):
        region.read_into(0, bytes(region.block_size))


def test_another_handle_sees_synced_blocks(region: BlockRegion) -> None:
    bs = region.block_size
    region.write_blocks(5, pattern(bs, 11))
    region.sync()
    with reopen(region) as other:
        assert other.read_blocks(5) == pattern(bs, 11)


def test_bytes_land_at_offset_plus_lba_times_block_size(tmp_path: Path) -> None:
    path = tmp_path / "o.img"
    with open_block(path, create_size=SIZE) as whole:
        bs = whole.block_size
    with open_block(path, offset=4 * bs, length=8 * bs) as region:
        assert region.nblocks == 8
        region.write_blocks(1, pattern(bs, 5))
        region.sync()
    raw = path.read_bytes()
    assert raw[5 * bs : 6 * bs] == pattern(bs, 5)
    assert raw[: 5 * bs] == bytes(5 * bs)


def test_large_io_is_split_into_chunks_and_stays_correct(region: BlockRegion, monkeypatch: pytest.MonkeyPatch) -> None:
    bs = region.block_size
    monkeypatch.setattr(blockmod, "MAX_IO_CHUNK", 2 * bs)
    data = pattern(7 * bs, 13)
    region.write_blocks(1, data)
    assert region.read_blocks(1, 7) == data


def test_write_accepts_memoryview_and_bytearray(region: BlockRegion) -> None:
    bs = region.block_size
    region.write_blocks(0, memoryview(bytearray(pattern(bs, 1))))
    assert region.read_blocks(0) == pattern(bs, 1)


# -- bounds and bad arguments ----------------------------------------------------


def test_lba_past_the_end_raises_capacity_exceeded(region: BlockRegion) -> None:
    bs = region.block_size
    with pytest.raises(CapacityExceeded):
        region.read_blocks(region.nblocks, 1)
    with pytest.raises(CapacityExceeded):
        region.write_blocks(region.nblocks - 1, bytes(2 * bs))
    with pytest.raises(CapacityExceeded):
        region.read_blocks(0, region.nblocks + 1)
    region.read_blocks(region.nblocks - 1, 1)  # the last block is in range


@pytest.mark.parametrize("lba", [-1, 1.0, True, "0"])
def test_bad_lba_raises_value_error(region: BlockRegion, lba: object) -> None:
    with pytest.raises(FabricValueError):
        region.read_blocks(lba, 1)


def test_partial_block_buffer_raises_misaligned(region: BlockRegion) -> None:
    with pytest.raises(Misaligned):
        region.write_blocks(0, bytes(region.block_size + 1))
    with pytest.raises(Misaligned):
        region.read_into(0, bytearray(100))


def test_misaligned_offset_or_length_raises_misaligned(tmp_path: Path) -> None:
    path = tmp_path / "m.img"
    with open_block(path, create_size=SIZE) as r:
        bs = r.block_size
    with pytest.raises(Misaligned):
        open_block(path, offset=bs // 2)
    with pytest.raises(Misaligned):
        open_block(path, length=bs + 1)


def test_range_past_the_end_of_the_file_raises_capacity_exceeded(tmp_path: Path) -> None:
    path = tmp_path / "e.img"
    with open_block(path, create_size=SIZE) as r:
        bs = r.block_size
    with pytest.raises(CapacityExceeded):
        open_block(path, offset=SIZE - bs, length=2 * bs)
    with pytest.raises(CapacityExceeded):
        open_block(path, offset=SIZE)


@pytest.mark.parametrize("kw", [{"offset": -4096}, {"length": 0}, {"create_size": -1}, {"offset": "0"}])
def test_bad_open_arguments_raise_value_error(tmp_path: Path, kw: dict[str, object]) -> None:
    with pytest.raises(FabricValueError):
        open_block(tmp_path / "x.img", **{"create_size": SIZE, **kw})


def test_a_character_device_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FabricValueError):
        open_block("/dev/null")


def test_a_missing_file_without_create_size_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_block(tmp_path / "missing.img")


def test_create_size_grows_a_smaller_file(tmp_path: Path) -> None:
    path = tmp_path / "g.img"
    path.write_bytes(b"\x01" * 4096)
    with open_block(path, create_size=SIZE) as region:
        assert region.nbytes == SIZE
        assert region.read_blocks(0)[:1] == b"\x01"


# -- lease, fail closed --------------------------------------------------------


def test_every_operation_fails_closed_after_the_lease_expires(tmp_path: Path) -> None:
    clock = ManualClock()
    with open_block(tmp_path / "t.img", create_size=SIZE, ttl=5.0, clock=clock) as region:
        bs = region.block_size
        region.write_blocks(0, pattern(bs, 2))
        clock.advance(5.0)
        for op in (
            lambda: region.read_blocks(0),
            lambda: region.write_blocks(0, bytes(bs)),
            lambda: region.sync(),
            lambda: region.read_into(0, bytearray(bs)),
        ):
            with pytest.raises(LeaseExpired):
                op()


def test_renewed_lease_keeps_the_region_usable(tmp_path: Path) -> None:
    clock = ManualClock()
    with open_block(tmp_path / "t.img", create_size=SIZE, ttl=5.0, clock=clock) as region:
        clock.advance(4.0)
        region.lease.renew()
        clock.advance(4.0)
        region.read_blocks(0)


def test_every_operation_raises_revoked_after_revoke(region: BlockRegion) -> None:
    region.lease.revoke()
    with pytest.raises(Revoked):
        region.read_blocks(0)
    with pytest.raises(Revoked):
        region.write_blocks(0, bytes(region.block_size))
    with pytest.raises(Revoked):
        region.sync()


def test_close_is_idempotent_and_later_operations_raise_disconnected(region: BlockRegion) -> None:
    region.close()
    region.close()
    assert region.closed
    with pytest.raises(Disconnected):
        region.read_blocks(0)
    with pytest.raises(Disconnected):
        region.fileno()


def test_context_manager_closes_the_region(tmp_path: Path) -> None:
    with open_block(tmp_path / "cm.img", create_size=SIZE) as region:
        fd = region.fileno()
    assert region.closed
    with pytest.raises(OSError):
        os.fstat(fd)


def test_freeing_an_open_block_lease_closes_it_and_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "k.img"
    region = open_block(path, create_size=SIZE)
    region.lease.free()
    with pytest.raises(LeaseExpired):
        region.read_blocks(0)
    assert path.exists()


def test_default_ttl_is_effectively_unbounded(tmp_path: Path) -> None:
    with open_block(tmp_path / "u.img", create_size=SIZE) as region:
        assert region.lease.remaining() > 365 * 24 * 3600


# -- O_DIRECT fallback -----------------------------------------------------------


def test_o_direct_refused_at_open_falls_back_to_buffered_and_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_open = os.open

    def fake_open(path: object, flags: int, *args: object) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", fake_open)
    with caplog.at_level(logging.WARNING, logger="grafos_fabric.drivers.block"):
        region = open_block(tmp_path / "b.img", create_size=SIZE)
    monkeypatch.undo()
    with region:
        assert not region.direct
        region.write_blocks(0, pattern(region.block_size, 4))
        region.sync()
        assert region.read_blocks(0) == pattern(region.block_size, 4)
    assert "buffered" in caplog.text


def test_o_direct_refused_at_first_io_falls_back_to_buffered_and_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    region = open_block(tmp_path / "b.img", create_size=SIZE)
    real_pwritev = os.pwritev
    calls = {"n": 0}

    def fake_pwritev(fd: int, bufs: list[memoryview], pos: int) -> int:
        calls["n"] += 1
        if region.direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwritev(fd, bufs, pos)

    monkeypatch.setattr(os, "pwritev", fake_pwritev)
    with region, caplog.at_level(logging.WARNING, logger="grafos_fabric.drivers.block"):
        region.write_blocks(0, pattern(region.block_size, 8))
        assert not region.direct
        assert calls["n"] == 2
        assert region.read_blocks(0) == pattern(region.block_size, 8)
    assert "falling back to buffered" in caplog.text


# -- BlockStore ----------------------------------------------------------------


def test_block_store_leases_are_files_freed_on_lease_free(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "blocks")
    region = store.lease_block(10_000, ttl=30.0)
    bs = region.block_size
    assert region.nbytes == -(-10_000 // bs) * bs
    assert store.leases() == [region.lease.id]
    assert Path(region.path).parent == tmp_path / "blocks"
    region.write_blocks(0, pattern(bs, 1))
    region.lease.free()
    assert store.leases() == []
    assert not Path(region.path).exists()
    with pytest.raises(LeaseExpired):
        region.read_blocks(0)


def test_block_store_attach_after_close_reads_the_data_back(tmp_path: Path) -> None:
    store = BlockStore(tmp_path / "blocks")
    region = store.lease_block(8192, ttl=30.0)
    lease_id, bs = region.lease.id, region.block_size
    region.write_blocks(1, pattern(bs, 6))
    region.sync()
    region.close()
    again = BlockStore(tmp_path / "blocks").attach(lease_id, ttl=5.0)
    assert again.read_blocks(1) == pattern(bs, 6)
    store.free(lease_id)
    with pytest.raises(LeaseExpired):
        store.attach(lease_id)


def test_block_store_lease_expires_with_its_clock(tmp_path: Path) -> None:
    clock = ManualClock()
    store = BlockStore(tmp_path / "blocks", clock=clock)
    region = store.lease_block(4096, ttl=2.0)
    clock.advance(2.5)
    with pytest.raises(LeaseExpired):
        region.read_blocks(0)
    store.free(region)
    assert store.leases() == []


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_block_store_refuses_bad_sizes(tmp_path: Path, bad: object) -> None:
    with pytest.raises(FabricValueError):
        BlockStore(tmp_path / "blocks").lease_block(bad, ttl=1.0)


@pytest.mark.parametrize("bad", ["../etc/passwd", "", "a/b", 5])
def test_block_store_refuses_lease_ids_that_are_not_names(tmp_path: Path, bad: object) -> None:
    with pytest.raises(FabricValueError):
        BlockStore(tmp_path / "blocks").attach(bad)


def test_block_store_on_tmpfs_logs_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shm = Path("/dev/shm")
    if filesystem_type(shm) != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm on this machine")
    target = shm / f"grafos-test-{os.getpid()}-{tmp_path.name}"
    try:
        with caplog.at_level(logging.WARNING, logger="grafos_fabric.drivers.block"):
            store = BlockStore(target)
        assert store.volatile
        assert "tmpfs" in caplog.text and "reboot" in caplog.text
    finally:
        for p in target.glob("*"):
            p.unlink()
        target.rmdir()


def test_block_store_on_persistent_storage_does_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if filesystem_type(tmp_path) in blockmod.VOLATILE_FILESYSTEMS:
        pytest.skip(f"{tmp_path} is itself on tmpfs here")
    with caplog.at_level(logging.WARNING, logger="grafos_fabric.drivers.block"):
        store = BlockStore(tmp_path / "blocks")
    assert not store.volatile
    assert caplog.text == ""


def test_filesystem_type_picks_the_longest_matching_mount(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\ntmpfs /data tmpfs rw 0 0\n/dev/vdb /data/disk\\040two xfs rw 0 0\n")
    assert filesystem_type("/data/x", str(mounts)) == "tmpfs"
    assert filesystem_type("/data/disk two/y", str(mounts)) == "xfs"
    assert filesystem_type("/database", str(mounts)) == "ext4"


def test_default_block_dir_honours_grafos_block_dir_then_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAFOS_BLOCK_DIR", "/srv/blocks")
    assert default_block_dir() == Path("/srv/blocks")
    monkeypatch.delenv("GRAFOS_BLOCK_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", "/var/xdg")
    assert default_block_dir() == Path("/var/xdg/grafos-fabric/blocks")
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_block_dir() == Path.home() / ".local/share/grafos-fabric/blocks"


def test_an_aligned_writable_buffer_is_written_without_a_bounce_copy(region: BlockRegion) -> None:
    import mmap

    bs = region.block_size
    buf = mmap.mmap(-1, 4 * bs)
    buf.write(pattern(4 * bs, 21))
    region.write_blocks(2, memoryview(buf)[bs : 3 * bs])  # block-aligned slice of a page-aligned mapping
    assert region._bounce is None
    assert region.read_blocks(2, 2) == pattern(4 * bs, 21)[bs : 3 * bs]
    region.write_blocks(0, bytes(bs))  # read-only bytes take the bounce buffer
    assert region._bounce is not None


def test_a_file_truncated_under_the_region_gives_corrupted_not_zeros(tmp_path: Path) -> None:
    path = tmp_path / "short.img"
    with open_block(path, create_size=SIZE) as region:
        os.truncate(path, region.block_size)
        with pytest.raises(Corrupted, match="truncated"):
            region.read_blocks(region.nblocks - 1)


def test_block_store_reports_a_full_disk_as_capacity_exceeded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    store = BlockStore(tmp_path / "blocks")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(CapacityExceeded):
        store.lease_block(1 << 20, ttl=1.0)
    assert store.leases() == []

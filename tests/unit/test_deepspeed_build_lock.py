"""The stale JIT build lock a killed DeepSpeed/torch extension build leaves behind is removed before a ZeRO
run; a lock some live process builds behind is kept. Processes are a fake /proc tree here (cmdline, cwd and
fd links, as Linux lays them out); tests/integration/test_process_cleanup.py does it with real processes."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from vlm_trainer.strategies import build_locks as lock_module
from vlm_trainer.strategies.build_locks import build_lock_holder, build_locks, clear_stale_build_locks

OLD = 3600.0


def lock(root: Path, op: str, age: float = OLD) -> Path:
    folder = root / op
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "lock"
    path.touch()
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def process(proc: Path, pid: int, *args: str, cwd: Path | None = None, open_files: tuple[Path, ...] = ()) -> None:
    base = proc / str(pid)
    (base / "fd").mkdir(parents=True)
    (base / "cmdline").write_bytes(b"\0".join(a.encode() for a in args) + b"\0")
    (base / "cwd").symlink_to(cwd or "/")
    for fd, target in enumerate(open_files, start=3):
        (base / "fd" / str(fd)).symlink_to(target)


@pytest.fixture
def ext(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "torch_extensions"
    root.mkdir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    return root


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "self").mkdir()  # not a pid: passed over
    process(proc, 1, "/sbin/init")
    return proc


def test_a_stale_lock_is_removed_and_logged(ext: Path, proc: Path, caplog: pytest.LogCaptureFixture) -> None:
    stale = lock(ext, "deepspeed_shm_comm")
    with caplog.at_level(logging.WARNING, logger=lock_module.__name__):
        assert clear_stale_build_locks(proc=str(proc)) == [str(stale)]  # $TORCH_EXTENSIONS_DIR is the root
    assert not stale.exists()
    assert (ext / "deepspeed_shm_comm").is_dir()  # only the lock goes; the build folder stays
    assert f"removed a stale JIT build lock {stale}" in caplog.text


def test_a_lock_with_a_live_builder_is_kept(ext: Path, proc: Path) -> None:
    compiling = lock(ext, "deepspeed_shm_comm")
    process(proc, 200, "ninja", "-v", cwd=ext / "deepspeed_shm_comm")  # ninja and c++ run in the folder
    named = lock(ext, "cpu_adam")
    process(proc, 300, "c++", "-c", str(ext / "cpu_adam" / "cpu_adam.cpp"), "-o", "cpu_adam.o")
    held = lock(ext, "fused_adam")
    process(proc, 400, "python", "-m", "vlm_trainer", open_files=(held,))  # the FileBaton's descriptor
    stale = lock(ext, "transformer_inference")
    assert clear_stale_build_locks(proc=str(proc)) == [str(stale)]
    assert compiling.exists() and named.exists() and held.exists()
    assert build_lock_holder(str(compiling), str(proc)) == "pid 200 (ninja)"
    assert build_lock_holder(str(named), str(proc)) == "pid 300 (c++)"
    assert build_lock_holder(str(held), str(proc)) == "pid 400 (python)"


def test_a_builder_of_another_folder_does_not_keep_a_lock(ext: Path, proc: Path) -> None:
    stale = lock(ext, "deepspeed_shm_comm")
    sibling = ext / "deepspeed_shm_comm_v2"  # a folder whose name extends the lock's
    process(proc, 200, "ninja", "-v", cwd=sibling)
    process(proc, 300, "c++", "-c", str(sibling / "shm.cpp"), f"-I{sibling}/include")
    assert clear_stale_build_locks(proc=str(proc)) == [str(stale)]


def test_a_young_lock_without_a_builder_is_waited_on_until_it_is_stale(ext: Path, proc: Path) -> None:
    young = lock(ext, "deepspeed_shm_comm", age=0)
    now = [time.time()]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    removed = clear_stale_build_locks(proc=str(proc), stale_after=5, clock=lambda: now[0], sleep=sleep)
    assert removed == [str(young)]
    assert 4 <= sum(slept) <= 6


def test_a_young_lock_whose_build_finishes_is_left_to_torch(ext: Path, proc: Path) -> None:
    young = lock(ext, "deepspeed_shm_comm", age=0)

    def sleep(seconds: float) -> None:
        young.unlink()  # the build released it while we waited

    assert clear_stale_build_locks(proc=str(proc), stale_after=5, sleep=sleep) == []


def test_locks_are_found_in_both_layouts_of_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`$TORCH_EXTENSIONS_DIR/<op>/lock`, and torch's default `<root>/<python>_<accelerator>/<op>/lock`."""
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    flat = lock(tmp_path / "flat", "deepspeed_shm_comm")
    nested = lock(tmp_path / "default" / "py311_cpu", "deepspeed_shm_comm")
    assert build_locks([str(tmp_path / "flat"), str(tmp_path / "default")]) == sorted([str(flat), str(nested)])
    from torch.utils.cpp_extension import get_default_build_root

    assert lock_module.torch_extension_roots() == [get_default_build_root()]

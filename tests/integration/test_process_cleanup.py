"""Processes that outlive what started them, with real processes: `vlm_operator.orphan_guard` (a launcher
killed by SIGKILL leaves CMD one SIGTERM, never several) and the DeepSpeed JIT build lock (a lock whose
builder is alive is kept)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

# CMD under the guard: counts the SIGTERMs it gets; after the first it waits a second for more, writes the
# count to argv[1] and exits 0.
COUNTER = textwrap.dedent("""
    import signal, sys, time
    got = []
    signal.signal(signal.SIGTERM, lambda *_: got.append(time.monotonic()))
    open(sys.argv[1] + ".ready", "w").close()
    while not got or time.monotonic() - got[0] < 1.0:
        time.sleep(0.01)
    open(sys.argv[1], "w").write(str(len(got)))
""")
# A launcher like vlmctl: several threads (each one re-parents its children as the process dies), then
# the guard started as TorchX does (a session of its own).
LAUNCHER = textwrap.dedent("""
    import signal, subprocess, sys, threading
    for _ in range(6):
        threading.Thread(target=threading.Event().wait, daemon=True).start()  # until the process dies
    guard = subprocess.Popen([sys.executable, "-m", "vlm_operator.orphan_guard", *sys.argv[1:]],
                             start_new_session=True)
    print(guard.pid, flush=True)
    signal.pause()  # until the test kills it
""")


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout} s")
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def guard(*cmd: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "vlm_operator.orphan_guard", *cmd], start_new_session=True)


@pytest.mark.parametrize("attempt", range(3))
def test_a_killed_multithreaded_launcher_leaves_cmd_exactly_one_sigterm(tmp_path: Path, attempt: int) -> None:
    count = tmp_path / "count"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, sys.executable, "-c", COUNTER, str(count)],
                                stdout=subprocess.PIPE, text=True)
    guard_pid = int(launcher.stdout.readline())
    wait_for(lambda: (tmp_path / "count.ready").exists(), 30, "CMD did not start")
    launcher.kill()
    launcher.wait(10)
    wait_for(count.exists, 30, "CMD got no SIGTERM")
    assert count.read_text() == "1"
    wait_for(lambda: gone(guard_pid), 30, "the guard did not exit after CMD")


def test_a_group_sigterm_reaches_cmd_once_and_the_guard_returns_its_status(tmp_path: Path) -> None:
    """TorchX stops an app with killpg(SIGTERM): CMD (in the guard's group) gets it once, not forwarded again."""
    count = tmp_path / "count"
    proc = guard(sys.executable, "-c", COUNTER, str(count))
    wait_for(lambda: (tmp_path / "count.ready").exists(), 30, "CMD did not start")
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0
    assert count.read_text() == "1"


def test_the_guard_passes_cmds_exit_status_on() -> None:
    assert guard(sys.executable, "-c", "raise SystemExit(3)").wait(30) == 3
    assert guard(sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)").wait(30) == -signal.SIGTERM


def test_cmd_dies_with_a_killed_guard(tmp_path: Path) -> None:
    proc = guard(sys.executable, "-c", "import signal; signal.pause()")  # lives until killed
    wait_for(lambda: psutil.Process(proc.pid).children(), 30, "CMD did not start")
    child = psutil.Process(proc.pid).children()[0]
    proc.kill()
    proc.wait(10)
    wait_for(lambda: gone(child.pid), 10, "CMD outlived its killed guard")


def test_a_build_lock_with_a_live_builder_is_kept_a_stale_one_removed(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Real processes, real /proc: a compiler working in one build folder, a process holding another lock
    open (as torch's FileBaton does for the whole build), and a lock left by a killed build."""
    from vlm_trainer.strategies.build_locks import clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    locks = {}
    for op in ("deepspeed_shm_comm", "cpu_adam", "fused_adam"):
        (tmp_path / op).mkdir()
        locks[op] = tmp_path / op / "lock"
        locks[op].touch()
        os.utime(locks[op], (time.time() - 3600, time.time() - 3600))
    # both live until killed below (a fixed lifetime could end before a loaded machine reaches the checks)
    compiler = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"], cwd=tmp_path / "cpu_adam")
    holder = subprocess.Popen([sys.executable, "-c", f"import os, signal; os.open({str(locks['fused_adam'])!r}, "
                               "os.O_RDONLY); print('open', flush=True); signal.pause()"], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"open\n"
        assert clear_stale_build_locks() == [str(locks["deepspeed_shm_comm"])]
        assert locks["cpu_adam"].exists() and locks["fused_adam"].exists()
    finally:
        compiler.kill()
        holder.kill()
        compiler.wait()
        holder.wait()
    # builders gone: now those locks are stale too
    assert sorted(clear_stale_build_locks()) == sorted([str(locks["cpu_adam"]), str(locks["fused_adam"])])

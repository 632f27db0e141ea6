"""Stale JIT build locks of torch's `cpp_extension` (and so of DeepSpeed's ops), found and removed.

On CPU DeepSpeed JIT-builds its shared-memory comm op (`deepspeed_shm_comm`) with gcc on first use, through
torch's `cpp_extension`, which guards each build folder with a `lock` file: created when a build starts,
removed when it ends. A build that is killed (a timeout, Ctrl-C, the OOM killer) leaves the lock behind, and
every later run then waits for it forever, silently. So before a ZeRO run starts, `clear_stale_build_locks`
removes the locks no live process builds behind (see there), and logs each one it removes.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import time
from collections.abc import Callable

# A lock younger than this with no live holder may be a build that is just starting: wait until it is this old.
STALE_BUILD_LOCK_SECONDS = 10.0

log = logging.getLogger(__name__)


def torch_extension_roots() -> list[str]:
    """Where torch's `cpp_extension` (and so DeepSpeed's JIT ops) builds: `$TORCH_EXTENSIONS_DIR`, or its
    default root (~/.cache/torch_extensions), under which torch adds a `<python>_<accelerator>` level."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return [os.environ["TORCH_EXTENSIONS_DIR"]]
    from torch.utils.cpp_extension import get_default_build_root

    return [get_default_build_root()]


def build_locks(roots: list[str]) -> list[str]:
    """The `lock` files of the extension build folders under `roots` (<root>/<op>/lock, <root>/<py_acc>/<op>/lock)."""
    found: set[str] = set()
    for root in roots:
        for pattern in ("*/lock", "*/*/lock"):
            found.update(glob.glob(os.path.join(glob.escape(root), pattern)))
    return sorted(found)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def build_lock_holder(lock: str, proc: str = "/proc") -> str | None:
    """A live process that builds behind `lock`, described; None if there is none. A process counts if it
    holds the lock file open (torch's FileBaton keeps the descriptor it created the lock with open for the
    whole build), works in the build folder (ninja and the compiler run there) or names the folder in its
    command line. Processes this one may not inspect (another user's) are passed over."""
    folder = os.path.dirname(os.path.realpath(lock))
    lock_path = os.path.realpath(lock)
    names_folder = re.compile(re.escape(folder) + r"(?:/|$)")  # the folder, not a sibling whose name extends it
    try:
        pids = [name for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        base = os.path.join(proc, pid)
        try:
            with open(os.path.join(base, "cmdline"), "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if not args:  # a zombie or a kernel thread
            continue
        what = f"pid {pid} ({os.path.basename(args[0])})"
        try:
            if _inside(os.readlink(os.path.join(base, "cwd")), folder):
                return what
        except OSError:
            pass
        if any(names_folder.search(arg) for arg in args):
            return what
        try:
            fds = os.listdir(os.path.join(base, "fd"))
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(os.path.join(base, "fd", fd)) == lock_path:
                    return what
            except OSError:
                continue
    return None


def clear_stale_build_locks(
    roots: list[str] | None = None,
    *,
    proc: str = "/proc",
    stale_after: float = STALE_BUILD_LOCK_SECONDS,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Remove the extension build locks that no live process builds behind (`build_lock_holder`) and that
    are at least `stale_after` seconds old (a younger one is waited on until it is that old, gone, or has a
    builder); return the removed paths. A lock with a live builder is kept: torch waits for that build."""
    removed = []
    for lock in build_locks(torch_extension_roots() if roots is None else roots):
        while True:
            try:
                age = clock() - os.stat(lock).st_mtime
            except FileNotFoundError:
                break
            holder = build_lock_holder(lock, proc)
            if holder is not None:
                log.info("JIT build lock %s is held by %s, a build in progress: kept", lock, holder)
                break
            if age >= stale_after:
                try:
                    os.remove(lock)
                except FileNotFoundError:
                    break
                removed.append(lock)
                log.warning(
                    "removed a stale JIT build lock %s (%.0f s old, no process builds in %s): a build killed "
                    "before it finished left it, and torch would have waited for it forever",
                    lock, age, os.path.dirname(lock),
                )
                break
            sleep(min(1.0, stale_after - age))
    return removed

"""`python -m vlm_operator.orphan_guard CMD [ARGS...]`: run CMD so that it is told to stop, with ONE SIGTERM,
when the process that started it dies, even by SIGKILL.

The local backend starts torchrun through it: TorchX gives torchrun a session of its own, so without this
a killed `vlmctl` would leave torchrun and its trainers running (reparented to init) until they finish.
torchrun turns the SIGTERM into a clean stop of its workers.

Why a process between the launcher and CMD, and not Linux's parent-death signal (prctl PR_SET_PDEATHSIG)
set on CMD itself (as this module once did before exec'ing CMD): the kernel sends the parent-death signal
on EVERY re-parenting, and a multi-threaded parent that dies (vlmctl runs 3 threads) re-parents its
children once per exiting thread. torchrun then got SIGTERM up to three times within milliseconds; its
elastic agent handles the first by stopping the workers, the second raises inside that shutdown (before it
stops its log-tailing threads), and the interpreter then waits for those non-daemon threads forever
(py-spy of the agent: MainThread in `_python_exit` -> `Thread.join`, two `TailLog` threads looping in
`tail_logfile`). That was the flaky "torchrun alive 30 s after vlmctl was SIGKILLed" (issue 19).

So the guard stays single-threaded as CMD's parent, notices its own parent's death by polling getppid(),
and sends CMD exactly one SIGTERM (SIGKILL if CMD is still alive `STOP_SECONDS` later). CMD stays in the
guard's process group, so a launcher that stops the group (TorchX: killpg SIGTERM, then SIGKILL) reaches
CMD directly; the guard does not forward the signals it receives itself (CMD got them already), it only
outlives them until CMD exits, then exits as CMD did (its code, or its signal). If the guard itself is
killed, CMD gets SIGKILL (its parent-death signal, from a single-threaded parent: once), as if the launcher
had killed it.
Elsewhere than Linux CMD simply runs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.2
# after the one SIGTERM: torchrun waits up to 30 s for its workers before it SIGKILLs them
STOP_SECONDS = 60.0


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` to this process when its parent exits. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _noted(signum: int, frame: object) -> None:
    """The guard outlives the launcher's stop signals (CMD, in the same process group, got them too)."""


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m vlm_operator.orphan_guard CMD [ARGS...]", file=sys.stderr)
        return 2
    if not sys.platform.startswith("linux"):
        os.execvp(argv[0], argv)
    parent, guard = os.getppid(), os.getpid()

    def die_with_guard() -> None:  # in CMD's process, before exec
        set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != guard:  # the guard died before the signal was armed
            os.kill(os.getpid(), signal.SIGKILL)

    # A Python handler, not SIG_IGN: handlers are reset to the default in CMD at exec, ignored signals are not.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _noted)
    child = subprocess.Popen(argv, close_fds=False, preexec_fn=die_with_guard)  # safe: one thread
    stop_by: float | None = None
    while True:
        try:
            code = child.wait(timeout=POLL_SECONDS)
            break
        except subprocess.TimeoutExpired:
            pass
        if stop_by is None and os.getppid() != parent:  # the launcher is gone (reparented to init/a subreaper)
            child.send_signal(signal.SIGTERM)
            stop_by = time.monotonic() + STOP_SECONDS
        elif stop_by is not None and time.monotonic() > stop_by:
            child.kill()
    if code < 0:  # CMD died of a signal: so does the guard, so the launcher sees what it would without it
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

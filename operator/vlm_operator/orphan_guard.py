"""`python -m vlm_operator.orphan_guard CMD [ARGS...]`: run CMD so that it is told to stop (SIGTERM) when
the process that started it dies, even by SIGKILL.

The local backend starts torchrun through it: TorchX gives torchrun a session of its own, so without this
a killed `vlmctl` would leave torchrun and its trainers running (reparented to init) until they finish.
torchrun turns the SIGTERM into a clean stop of its workers. Linux's parent-death signal (prctl), which
survives the exec; elsewhere CMD simply runs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` to this process when its parent exits. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m vlm_operator.orphan_guard CMD [ARGS...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    set_parent_death_signal()
    if os.getppid() != parent:  # the parent died before the signal was armed
        return 143
    os.execvp(argv[0], argv)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

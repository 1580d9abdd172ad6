"""Child processes that stop when their parent is stopped, however it is stopped.

A stopped ``msif`` must not leave a build, a torchrun job or a server running behind it. Ctrl+C
and SIGTERM: turned into KeyboardInterrupt while a child runs, and the child is then terminated
(and killed if it does not end). kill -9, which no handler sees: every child asks the kernel for
SIGTERM when its parent dies (Linux ``PR_SET_PDEATHSIG``), and so does each torchrun worker, so a
chain msif -> build -> torchrun -> workers unwinds from whichever link is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None, sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send this process ``sig`` when its parent ends (Linux; elsewhere nothing).
    ``parent``: the pid it must still have, else it exits now (the parent died before the request)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def dies_with_this_process() -> Callable[[], None]:
    """A ``preexec_fn`` for Popen: the child is sent SIGTERM when this process ends, even by kill -9."""
    parent = os.getpid()
    return lambda: die_with_parent(parent)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block (the previous handler is restored)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate ``process`` and wait for it; kill it if it does not end in ``timeout`` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_child(command: Sequence[str], env: dict | None = None) -> int:
    """Run ``command`` to its end and return its exit code; 130 when this process is stopped
    (the child is stopped too)."""
    child = subprocess.Popen(list(command), env=env, preexec_fn=dies_with_this_process())
    try:
        with sigterm_interrupts():
            return child.wait()
    except KeyboardInterrupt:
        stop(child)
        return 130

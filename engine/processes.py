"""Child processes that stop when their parent is stopped, by Ctrl+C or by SIGTERM.

A terminated ``msif`` must not leave a build, a torchrun job or a server running behind it:
SIGTERM is turned into KeyboardInterrupt while a child runs, and the child is then terminated
(and killed if it does not end), whatever launched it.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator, Sequence


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
    child = subprocess.Popen(list(command), env=env)
    try:
        with sigterm_interrupts():
            return child.wait()
    except KeyboardInterrupt:
        stop(child)
        return 130

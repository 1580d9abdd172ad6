"""One build at a time per study directory: a lock file naming its holder (PID, host, command).

The lock is an exclusive ``flock`` on ``build.lock``, which the kernel releases when its process
ends however it ends (kill -9, a crash): a lock file left by a dead build is detected as stale
and taken over, and a live holder is named in the refusal.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

LOCK = "build.lock"  # in the study directory; never listed in the manifest


class StudyLocked(RuntimeError):
    """Another live build holds the study directory."""


class BuildLock:
    """``with BuildLock(directory):`` holds the directory's build lock for the block."""

    def __init__(self, directory: str | os.PathLike, command: list[str] | None = None):
        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self.command = command if command is not None else ["msif", *sys.argv[1:]]
        self.fd: int | None = None
        self.took_over: dict | None = None  # the dead holder whose lock was taken over, if any

    def holder(self) -> dict:
        """Who holds (or last held) the lock, as its file says; {} if unreadable."""
        try:
            data = json.loads(self.path.read_text() or "{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> BuildLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StudyLocked(self._message(self.holder())) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder removed the file as we opened it: lock the new one
                break
            os.close(fd)
        previous = self.holder()
        self.took_over = previous or None  # a file with a holder but no flock: that build died
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                                 "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def _message(self, holder: dict) -> str:
        command = " ".join(map(str, holder.get("command", []))) or "a build"
        host = holder.get("host", "?")
        where = f"pid {holder.get('pid', '?')}" + ("" if host == socket.gethostname() else f" on {host}")
        return (f"another build is writing {self.directory} ({command}; {where}, since {holder.get('since', '?')}): "
                "wait for it to finish or stop it, then run this command again")

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter then locks a fresh file
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> BuildLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

"""Serving the Streamlit app (``explorer/app.py``) on a study until interrupted."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import webbrowser
from pathlib import Path

from engine.processes import dies_with_this_process, sigterm_interrupts, stop

STUDY_ENV, DEVICE_ENV = "MSIF_STUDY", "MSIF_DEVICE"  # how the server tells the pages what to open
FACTORS_ENV = "MSIF_FACTOR_PRECISION"  # and how to hold the factors (empty: as the study says)
APP = Path(__file__).resolve().parent / "app.py"


def wait_until_serving(url: str, process: subprocess.Popen, timeout: float) -> bool:
    """True once the Streamlit server at ``url`` answers its health check; False if ``process``
    exits or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
            return True
        except OSError:
            time.sleep(0.1)
    return False


def check_port(host: str, port: int) -> None:
    """Refuse a port that is taken before starting: the health check would otherwise find the
    server already there (another study) and announce its URL as this one's."""
    import errno
    import socket

    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port} is not a TCP port (1-65535)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ValueError(f"--host {host!r} is not an address of this machine") from None
    for family, _, _, _, address in infos:  # the server listens on every address of the name
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is free
            try:
                probe.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRNOTAVAIL:  # e.g. no IPv6 here
                    continue
                raise ValueError(f"port {port} on {host} is in use (another msif app?): pass --port with a free "
                                 f"one, e.g. --port {port + 1}") from None


def serve(study: Path, host: str, port: int, device: str = "auto", open_browser: bool = False,
          factor_precision: str | None = None) -> int:
    """Run the Streamlit app on ``study`` until interrupted; returns the server's exit code."""
    check_port(host, port)
    env = dict(os.environ, **{STUDY_ENV: str(study.resolve()), DEVICE_ENV: device,
                              FACTORS_ENV: factor_precision or ""})
    command = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", host,
               "--server.port", str(port), "--server.headless", "true",
               "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
               "--theme.base", "light", "--client.toolbarMode", "viewer",
               "--client.showErrorDetails", "none"]  # an unforeseen error: a generic message, no traceback or path
    server = subprocess.Popen(command, env=env, preexec_fn=dies_with_this_process())  # kill -9 of msif too
    url = f"http://{'localhost' if host in ('0.0.0.0', '::') else host}:{port}"
    try:
        with sigterm_interrupts():  # a terminated `msif app` must not leave its server running
            return _run_server(server, study, url, open_browser)
    except KeyboardInterrupt:
        stop(server)
        return 0


def _run_server(server: subprocess.Popen, study: Path, url: str, open_browser: bool) -> int:
    if not wait_until_serving(url, server, timeout=60) and server.poll() is not None:
        return server.returncode
    print(f"\nMSIF Explorer on {study}: {url}  (Ctrl+C stops it)", flush=True)
    # Without a display, webbrowser would start a console browser (lynx) in this terminal.
    if open_browser and (sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY")
                         or os.environ.get("WAYLAND_DISPLAY")):
        webbrowser.open(url)
    return server.wait()

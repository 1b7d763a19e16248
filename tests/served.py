"""``byod serve`` as an operator runs it, for the tests that speak to a real server
process over real sockets."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import byod
from tests.conftest import LOOPBACK_ALLOWED
from tests.test_cli import BYOD


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(**settings: str) -> dict[str, str]:
    """This process's environment without any ``BYOD_`` setting, running this very code,
    with ``settings``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BYOD_")}
    here = str(Path(byod.__file__).resolve().parents[1])
    return clean | {
        "PYTHONPATH": os.pathsep.join([here, *filter(None, [clean.get("PYTHONPATH")])]),
        **LOOPBACK_ALLOWED,
        **settings,
    }


@dataclass
class Served:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def raw(self, head: str, body: bytes = b"") -> socket.socket:
        """A connection on which ``head`` (request line and headers) and ``body`` were sent."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        return sock


@contextlib.contextmanager
def serve(env: dict[str, str], folder: Path, **extra: str) -> Iterator[Served]:
    port = free_port()
    log = folder / f"serve-{port}.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [*BYOD, "serve", "--port", str(port)],
            cwd=folder,
            env=env | extra,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, "byod serve did not start"
            time.sleep(0.1)
        yield Served(f"http://127.0.0.1:{port}", port, process, log)
    finally:
        process.terminate()
        process.wait(20)

"""A TCP forwarder on loopback that a test can cut (every connection through it is
dropped and new ones are refused until it is restored: a server that went away) or slow
(each chunk forwarded late: a server far away or overloaded)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

__all__ = ["CuttableProxy"]


class CuttableProxy:
    """Forwards ``host``:``port`` (127.0.0.1 unless given) to 127.0.0.1:``target_port``;
    :meth:`cut`, :meth:`slow` and :meth:`restore`."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.delay = 0.0
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        """Drop every connection; refuse new ones."""
        with self.lock:
            self.up = False
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self.sockets.clear()

    def slow(self, seconds: float) -> None:
        """Forward each chunk ``seconds`` late, both ways (0: at once)."""
        self.delay = seconds

    def restore(self) -> None:
        """Forward again (at the pace :meth:`slow` set)."""
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if self.delay:
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

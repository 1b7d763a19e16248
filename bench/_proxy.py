"""A small TCP proxy on loopback that adds latency and counts round trips.

Each chunk is delayed by half the added latency in each direction, so one request and
its answer cost the full ``latency_ms`` more, as over a real network. A round trip is
counted each time the client speaks after the server has (or first).
"""

from __future__ import annotations

import asyncio
import threading
import time

__all__ = ["LatencyProxy"]


class LatencyProxy:
    """Forwards 127.0.0.1:<port> to ``target``; run with ``start()``, read ``round_trips``."""

    def __init__(self, target_port: int, latency_ms: float, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.delay = latency_ms / 2000.0
        self.round_trips = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="latency-proxy")

    def start(self) -> LatencyProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(5)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", 0, backlog=1024)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        state = {"last": "server"}
        await asyncio.gather(
            self._pipe(reader, up_writer, state, "client"),
            self._pipe(up_reader, writer, state, "server"),
        )

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        state: dict[str, str],
        side: str,
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(deliver())
        try:
            while True:
                data = await reader.read(65536)
                if side == "client" and data and state["last"] == "server":
                    self.round_trips += 1
                if data:
                    state["last"] = side
                queue.put_nowait((time.monotonic() + self.delay, data))
                if not data:
                    break
        except (ConnectionError, OSError):
            queue.put_nowait((0.0, b""))
        await sender

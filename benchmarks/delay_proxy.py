"""A TCP proxy in front of an HTTP server that holds every request a fixed time before forwarding it, as a bucket in
another building would, and counts the requests by kind (``object_store.py`` puts it in front of moto's S3 server).

It runs as a process of its own, importing nothing but the standard library: like a network, it takes neither the
writer's cores nor its GIL. The counts live in a small file both processes map.

    python delay_proxy.py UPSTREAM_PORT LATENCY_S COUNTS_FILE
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

KINDS = ("GET", "HEAD", "PUT", "POST", "DELETE", "LIST", "BULK-DELETE")
_COUNTS = struct.Struct(f"{len(KINDS)}q")


def request_kind(line: bytes) -> str:
    """GET, HEAD, PUT, DELETE, LIST or BULK-DELETE, from an HTTP request line of the S3 API (path-style)."""
    method, target = line.split(b" ")[:2]
    query = urlsplit(target.decode()).query
    if method == b"GET" and "list-type" in query:
        return "LIST"
    if method == b"POST" and "delete" in query:
        return "BULK-DELETE"
    return method.decode()


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a process has used, from Linux's /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class DelayProxy:
    """The proxy in front of ``127.0.0.1:upstream_port``, holding every request ``latency_s`` (each connection on
    its own, so concurrent requests wait concurrently), in a process of its own on ``cpus`` when given.

    Args:
        upstream_port: The server's port on 127.0.0.1.
        latency_s: Added delay per request.
        cpus: Cores the proxy's process may use.
    """

    def __init__(self, upstream_port: int, latency_s: float, cpus: set[int] | None = None) -> None:
        self.upstream_port = upstream_port
        self.latency_s = latency_s
        self.cpus = cpus

    def start(self) -> int:
        """Start serving on 127.0.0.1; returns the port."""
        handle, path = tempfile.mkstemp(prefix="delay-proxy-")
        os.write(handle, bytes(_COUNTS.size))
        self._counts = mmap.mmap(handle, _COUNTS.size)
        os.close(handle)
        self._path = path
        cpus = self.cpus
        self._process = subprocess.Popen(
            [sys.executable, __file__, str(self.upstream_port), repr(self.latency_s), path],
            stdout=subprocess.PIPE,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError("the delay proxy did not start")
        return int(line)

    def requests(self) -> Counter:
        """The requests forwarded so far, by kind."""
        return Counter({kind: n for kind, n in zip(KINDS, _COUNTS.unpack_from(self._counts), strict=True) if n})

    def cpu_s(self) -> float:
        """CPU seconds the proxy's process has used."""
        return cpu_seconds(self._process.pid)

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait()
        self._process.stdout.close()
        self._counts.close()
        os.unlink(self._path)


def serve(upstream_port: int, latency_s: float, counts_file: str) -> None:
    """Serve until terminated; print the port listened on, then count into ``counts_file``."""
    with open(counts_file, "r+b") as file:
        counts = mmap.mmap(file.fileno(), _COUNTS.size)

    def count(kind: str) -> None:
        offset = KINDS.index(kind) * 8
        struct.pack_into("q", counts, offset, struct.unpack_from("q", counts, offset)[0] + 1)

    async def forward(client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        await _forward(client, to_client, upstream_port, latency_s, count)

    async def main() -> None:
        server = await asyncio.start_server(forward, "127.0.0.1", 0, limit=1 << 20)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())


async def _forward(client, to_client, upstream_port: int, latency_s: float, count) -> None:
    """One client connection: each request held ``latency_s``, counted, then forwarded; answers piped back."""
    from_upstream, to_upstream = await asyncio.open_connection("127.0.0.1", upstream_port, limit=1 << 20)
    back = asyncio.create_task(_pipe(from_upstream, to_client))
    try:
        while True:
            head = await client.readuntil(b"\r\n\r\n")
            count(request_kind(head.split(b"\r\n", 1)[0]))
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)
            }
            await asyncio.sleep(latency_s)
            to_upstream.write(head)
            if headers.get(b"transfer-encoding") == b"chunked":
                while True:
                    size_line = await client.readuntil(b"\r\n")
                    size = int(size_line.split(b";")[0], 16)
                    to_upstream.write(size_line + await client.readexactly(size + 2 if size else 0))
                    if size == 0:  # trailers, then an empty line
                        while (line := await client.readuntil(b"\r\n")) != b"\r\n":
                            to_upstream.write(line)
                        to_upstream.write(b"\r\n")
                        break
            else:
                length = int(headers.get(b"content-length", b"0"))
                while length:  # forwarded as it comes: a client may wait for "100 Continue" first
                    data = await client.read(min(length, 1 << 20))
                    if not data:
                        raise ConnectionError("client went away")
                    to_upstream.write(data)
                    length -= len(data)
            await to_upstream.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the client went away
    finally:
        back.cancel()
        for writer in (to_upstream, to_client):
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.CancelledError):
        while data := await reader.read(1 << 20):
            writer.write(data)
            await writer.drain()
    writer.close()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        serve(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3])

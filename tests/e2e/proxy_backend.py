"""A pod for proxy end-to-end tests: answers its own name over HTTP and hashes bulk uploads.

    python3 proxy_backend.py NAME [--http 8080] [--bulk 9000]

HTTP/1.1 (keep-alive unless the client says close): any path answers "NAME\n", except /hits
which answers how many other requests were served and /peer, the client address it sees. The
bulk port reads until the client's EOF (half-close), then answers "<bytes> <sha256 hex>\n" and
closes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from typing import Any


class Http(asyncio.Protocol):
    hits = 0

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.buf = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
            if path == b"/hits":
                body = f"{Http.hits}\n".encode()
            elif path == b"/peer":
                body = f"{self.transport.get_extra_info('peername')[0]}\n".encode()
            else:
                Http.hits += 1
                body = self.name + b"\n"
            close = b"connection: close" in head.lower()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
                % (len(body), b"Connection: close\r\n" if close else b"", body))
            if close:
                self.transport.close()
                return


class Bulk(asyncio.Protocol):
    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.count = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.hash.update(data)
        self.count += len(data)

    def eof_received(self) -> bool:
        self.transport.write(f"{self.count} {self.hash.hexdigest()}\n".encode())
        self.transport.close()
        return True


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--http", type=int, default=8080)
    p.add_argument("--bulk", type=int, default=9000)
    a = p.parse_args()
    loop = asyncio.get_running_loop()
    # host None: every address of both families.
    await loop.create_server(lambda: Http(a.name.encode()), None, a.http, reuse_address=True)
    await loop.create_server(Bulk, None, a.bulk, reuse_address=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())

"""A tiny TCP server that tells who answered: on each connection it writes its id and closes.

    python -m bench.idserver 10.244.0.2:9001=A 10.244.0.2:9002=B

The endpoint-change scenario flips a Service between two of these and polls until new
connections reach the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


class _Reply(asyncio.Protocol):
    def __init__(self, ident: bytes) -> None:
        self.ident = ident

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self.ident)
        transport.close()


async def main(specs: list[str]) -> None:
    loop = asyncio.get_running_loop()
    for spec in specs:
        address, ident = spec.split("=", 1)
        host, port = address.rsplit(":", 1)
        reply = ident.encode()
        await loop.create_server(lambda r=reply: _Reply(r), host, int(port),  # type: ignore[misc]
                                 backlog=4096, reuse_address=True)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(sys.argv[1:]))

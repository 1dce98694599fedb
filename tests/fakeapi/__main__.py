"""Run the fake API server as its own process (benchmarks: its CPU must not count as ours).

    python -m tests.fakeapi --port 0 --pki DIR --objects objects.json [--token T]

Prints `listening <url>` on stdout once it accepts connections; runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from .certs import PKI, make_pki
from .server import FakeAPIServer


async def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.fakeapi")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--pki", type=Path, required=True, help="directory of make_pki() files")
    p.add_argument("--objects", type=Path, help="a JSON array of Services/EndpointSlices")
    p.add_argument("--token", default="test-token")
    p.add_argument("--bookmark-interval", type=float, default=60.0)
    args = p.parse_args()
    pki = PKI(args.pki) if (args.pki / "ca.crt").exists() else make_pki(args.pki)
    server = FakeAPIServer(tokens={args.token}, bookmark_interval=args.bookmark_interval)
    if args.objects:
        server.load(json.loads(args.objects.read_bytes()))
    ctx = server.server_ssl_context(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    url = await server.start(ctx, port=args.port)
    print(f"listening {url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)

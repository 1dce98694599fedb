"""Runs nftables transactions: in-process through libnftables where it loads, else `nft -f -`.

A transaction is nft's own text (what proxy/capture.py renders); either way it is parsed and
committed as one netlink batch, so it applies whole or not at all. libnftables (Debian's
libnftables1, through the `nftables` Python binding) saves the process start of `nft` on every
sync, which is most of a small transaction's cost. Calls block: run them on a thread.
"""

from __future__ import annotations

import subprocess
import threading
from typing import Any

from kubeshim.cluster.log import get_logger

log = get_logger("proxy")


class Nft:
    """One libnftables context (or the `nft` program), serialised: a context is not
    thread-safe."""

    def __init__(self, library: bool = True) -> None:
        self._lock = threading.Lock()
        self._ctx: Any = None
        self.backend = "nft -f -"
        if not library:
            return
        try:
            import nftables

            self._ctx = nftables.Nftables()
        except (ImportError, OSError) as e:
            log.info("libnftables unavailable, running nft", reason=str(e))
            return
        self.backend = "libnftables"

    def run(self, text: str) -> tuple[int, str]:
        """Apply `text` as one transaction: (0, "") or (an error code, the error nft gave)."""
        if self._ctx is None:
            return _run_program(text)
        with self._lock:
            rc, _, err = self._ctx.cmd(text)
        return rc, err.strip()


def _run_program(text: str) -> tuple[int, str]:
    try:
        out = subprocess.run(["nft", "-f", "-"], input=text, capture_output=True, text=True,
                             timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 127, f"cannot run nft: {e}"
    return out.returncode, out.stderr.strip()

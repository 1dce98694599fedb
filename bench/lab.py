"""The bench's own network namespace and the processes it starts there.

The harness moves itself into a fresh network namespace (`ksb<pid>`) before starting anything,
so every contender, backend and load generator it spawns lives there too: nothing listens in,
or sends to, the root namespace, and nftables rules exist only inside the bench's namespace.
Every process is started by this module and ended by pid (SIGTERM, then SIGKILL), also when
the run fails or is interrupted; the namespace is deleted last.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

CLONE_NEWNET = 0x40000000
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# Addresses inside the bench namespace, all on its loopback device.
POD_IP = "10.244.0.2"  # where the backends listen ("the pod")


class BenchError(RuntimeError):
    """A step of the bench failed; the message says which and why."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[Any]
    log: Path
    cpu: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[int]:
        """This process and its descendants (nginx's workers)."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def cpu_seconds(self, ended_children: bool = False) -> float:
        """utime + stime of the process tree, from /proc/<pid>/stat (fields 14 and 15); with
        `ended_children`, plus what its children that have ended and were waited for used
        (cutime + cstime, fields 16 and 17)."""
        total = 0
        for pid in self.tree():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
            if ended_children:
                total += int(fields[13]) + int(fields[14])
        return total / CLK_TCK

    def rss_bytes(self) -> int:
        total = 0
        for pid in self.tree():
            with contextlib.suppress(OSError):
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        return total

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class Lab:
    """The namespace, the work directory and every process started in it."""

    workdir: Path
    name: str = field(default_factory=lambda: f"ksb{os.getpid()}")
    procs: list[Proc] = field(default_factory=list)
    entered: bool = False

    # --- namespace ----------------------------------------------------------------------

    def enter(self) -> None:
        """Create the namespace and move this (single-threaded) process into it."""
        if os.geteuid() != 0:
            raise BenchError("the bench needs root: it creates a network namespace")
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.entered = True
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise BenchError(f"setns into {self.name}: {os.strerror(err)}")
        finally:
            os.close(fd)
        self.sh("ip link set lo up")
        self.sh(f"ip addr add {POD_IP}/32 dev lo")
        # Many short connections per second: the whole port range, deep accept queues.
        for key, value in {
            "net.ipv4.ip_local_port_range": "1024 65000",
            "net.ipv4.tcp_tw_reuse": "1",
            "net.core.somaxconn": "65535",
            "net.ipv4.tcp_max_syn_backlog": "65535",
            # No TIME_WAIT sockets: at thousands of new connections per second the client's
            # ephemeral ports wrap within the 60 s TIME_WAIT of the server's (closing) side,
            # and SYNs meeting those sockets stall for a 1 s retransmit.
            "net.ipv4.tcp_max_tw_buckets": "0",
        }.items():
            self.sh(f"sysctl -qw {key}='{value}'", check=False)

    def add_address(self, ip: str) -> None:
        self.sh(f"ip addr add {ip}/32 dev lo")

    def sh(self, cmd: str, check: bool = True, timeout: float = 60) -> str:
        proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise BenchError(f"`{cmd}` exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    # --- processes ----------------------------------------------------------------------

    def start(
        self,
        name: str,
        argv: Sequence[str],
        cpu: str,
        *,
        env: dict[str, str] | None = None,
        stdout: int | IO[Any] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        """Start `argv` pinned to `cpu` (a taskset list) with its output in a log file."""
        log = self.workdir / f"{name}.log"
        logf = open(log, "ab")  # noqa: SIM115 - owned by the child from here on
        full_env = {**os.environ, **(env or {})}
        popen = subprocess.Popen(
            ["taskset", "-c", cpu, *argv],
            stdout=stdout if stdout is not None else logf,
            stderr=logf,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=cwd,
            start_new_session=True,  # Ctrl-C reaches the harness only; it ends these by pid
            preexec_fn=_raise_nofile,
        )
        logf.close()
        proc = Proc(name, popen, log, cpu)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 10) -> None:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.kill()
                proc.popen.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=5)
        if self.entered:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
            self.entered = False


def _raise_nofile() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_tcp(host: str, port: int, proc: Proc | None = None, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise BenchError(f"{proc.name} exited {proc.popen.returncode}:\n{proc.tail()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing accepts on {host}:{port}" + (f"\n{proc.tail()}" if proc else ""))


def dns_query(qname: str, qtype: int = 1, qid: int = 0x4242) -> bytes:
    """A minimal RFC 1035 query (RD set)."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in qname.strip(".").split("."))
    return (
        qid.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        + labels + b"\x00" + qtype.to_bytes(2, "big") + b"\x00\x01"
    )


def wait_dns(host: str, port: int, qname: str, proc: Proc | None = None,
             timeout: float = 15, want: bytes | None = None) -> float:
    """Poll until the server answers `qname` (with `want` somewhere in the reply, if given);
    returns the time it took."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    query = dns_query(qname)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive():
                raise BenchError(f"{proc.name} exited {proc.popen.returncode}:\n{proc.tail()}")
            try:
                s.sendto(query, (host, port))
                reply = s.recv(4096)
                rcode = reply[3] & 0x0F
                ancount = int.from_bytes(reply[6:8], "big")
                if rcode == 0 and ancount and (want is None or want in reply[12:]):
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.02)
    raise BenchError(f"no DNS answer for {qname} from {host}:{port}"
                     + (f"\n{proc.tail()}" if proc else ""))

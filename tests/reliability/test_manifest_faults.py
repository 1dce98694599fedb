"""Hostile and broken manifest folders: each fault is reported and skipped, the event loop keeps
running, and nothing that was served is withdrawn.

The source runs on a real folder with real links, FIFOs, devices and large files; a ticker task
measures how long the event loop is held, which is what proxy, DNS and /healthz share.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from kubeshim.cluster.model import NamespacedName
from kubeshim.cluster.sources import manifests
from kubeshim.cluster.sources.manifests import ManifestSource, load_file
from kubeshim.cluster.state import ClusterState, ServiceChange

SVC = """\
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {ip}
  ports: [{{name: http, port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints: [{{addresses: [{ep}]}}]
"""


def manifest(name: str, ip: str, ep: str = "10.244.0.5") -> str:
    return SVC.format(name=name, ip=ip, ep=ep)


def write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(
        r.getMessage() + "".join(f" {k}={v}" for k, v in getattr(r, "kv", {}).items())
        for r in caplog.records
    )


class Harness:
    """A running ManifestSource plus a ticker that records the longest event-loop stall."""

    def __init__(self, folder: Path, **kwargs: object) -> None:
        self.state = ClusterState()
        self.withdrawn: list[str] = []
        self.state.subscribe(self._changes)
        self.source = ManifestSource(folder, self.state, poll_interval=3600, **kwargs)  # type: ignore[arg-type]
        self.max_stall = 0.0
        self.task = asyncio.create_task(self.source.run())
        self.ticker = asyncio.create_task(self._tick())

    def _changes(self, changes: list[ServiceChange]) -> None:
        self.withdrawn += [str(c.key) for c in changes if c.current is None]

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.005)
            self.max_stall = max(self.max_stall, loop.time() - t - 0.005)

    def services(self) -> set[str]:
        return {str(k) for k in self.state.services}

    async def wait(self, cond: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.01)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**kwargs: object) -> Harness:
        h = Harness(tmp_path, **kwargs)
        made.append(h)
        return h

    yield make
    for h in made:
        h.task.cancel()
        h.ticker.cancel()


async def test_edits_arrive_through_inotify_not_polling(tmp_path: Path, harness) -> None:
    write(tmp_path / "a.yaml", manifest("a", "10.96.0.1"))
    h = harness()  # polls once an hour: only inotify can deliver the edits below in time
    await h.wait(lambda: h.state.synced and h.services() == {"default/a"})
    assert h.source.mode == "inotify"
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "b.yaml", manifest("b", "10.96.0.2"))
    await h.wait(lambda: h.services() == {"default/a", "default/b"})
    with open(tmp_path / "sub" / "b.yaml", "w") as f:  # edited in place: read once closed
        f.write(manifest("b", "10.96.0.2", "10.244.0.9"))
    await h.wait(lambda: h.state.services[NamespacedName("default", "b")]
                 .ports[0].endpoints[0].ip == "10.244.0.9")
    (tmp_path / "a.yaml").unlink()
    await h.wait(lambda: h.services() == {"default/b"})


async def test_configmap_swap_through_inotify(tmp_path: Path, harness) -> None:
    (tmp_path / "..v1").mkdir()
    (tmp_path / "..v1" / "svc.yaml").write_text(manifest("a", "10.96.0.1", "10.244.0.1"))
    os.symlink("..v1", tmp_path / "..data")
    os.symlink("..data/svc.yaml", tmp_path / "svc.yaml")
    h = harness()
    await h.wait(lambda: h.services() == {"default/a"})
    (tmp_path / "..v2").mkdir()
    (tmp_path / "..v2" / "svc.yaml").write_text(manifest("a", "10.96.0.1", "10.244.0.2"))
    os.symlink("..v2", tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    await h.wait(lambda: h.state.services[NamespacedName("default", "a")]
                 .ports[0].endpoints[0].ip == "10.244.0.2")


async def test_one_walk_at_start_and_none_for_other_files(tmp_path: Path, harness) -> None:
    write(tmp_path / "a.yaml", manifest("a", "10.96.0.1"))
    write(tmp_path / "b.yaml", manifest("b", "10.96.0.2"))
    h = harness()
    await h.wait(lambda: h.services() == {"default/a", "default/b"})
    assert h.source.mode == "inotify"
    await asyncio.sleep(0.2)
    assert h.source.walks == 1  # the watches were set while the folder was read
    # `sed -i` writes a temp file beside the manifest and renames it over it; a README and an
    # editor's probe file come and go. Only the manifest is read again: no walk of the folder.
    subprocess.run(["sed", "-i", "s/10.244.0.5/10.244.0.6/", str(tmp_path / "a.yaml")],
                   check=True)
    (tmp_path / "README").write_text("not a manifest\n")
    (tmp_path / "4913").write_text("")
    (tmp_path / "4913").unlink()
    await h.wait(lambda: h.state.services[NamespacedName("default", "a")]
                 .ports[0].endpoints[0].ip == "10.244.0.6")
    await asyncio.sleep(0.2)
    assert h.source.walks == 1
    # A link to a directory is a directory: its manifests are served, and withdrawn with it.
    (tmp_path / ".more").mkdir()
    write(tmp_path / ".more" / "c.yaml", manifest("c", "10.96.0.3"))
    os.symlink(".more", tmp_path / "more")
    await h.wait(lambda: h.services() == {"default/a", "default/b", "default/c"})
    write(tmp_path / ".more" / "c.yaml", manifest("c", "10.96.0.3", "10.244.0.9"))
    await h.wait(lambda: h.state.services[NamespacedName("default", "c")]
                 .ports[0].endpoints[0].ip == "10.244.0.9")
    os.unlink(tmp_path / "more")
    await h.wait(lambda: h.services() == {"default/a", "default/b"})
    assert h.withdrawn == ["default/c"]


async def test_symlink_loops_fifo_device_and_huge_file_are_skipped(
        tmp_path: Path, harness, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / "a.yaml", manifest("a", "10.96.0.1"))
    os.symlink(".", tmp_path / "loop1")  # two links to the folder itself
    os.symlink(".", tmp_path / "loop2")
    os.symlink("x.yaml", tmp_path / "y.yaml")  # a loop between two file links
    os.symlink("y.yaml", tmp_path / "x.yaml")
    os.mkfifo(tmp_path / "fifo.yaml")  # opening it for reading would block
    os.symlink("/dev/zero", tmp_path / "zero.yaml")  # endless
    with open(tmp_path / "huge.yaml", "wb") as f:  # 86 MB
        f.truncate(86 * 1024 * 1024)
    h = harness()
    await h.wait(lambda: h.state.synced)
    await asyncio.sleep(0.3)
    assert h.services() == {"default/a"}
    text = log_text(caplog)
    assert f"file={tmp_path / 'fifo.yaml'} reason=a FIFO, not a regular file; skipped" in text
    assert (f"file={tmp_path / 'zero.yaml'} reason=a character device, not a regular file; "
            "skipped") in text
    assert (f"file={tmp_path / 'huge.yaml'} reason=90177536 bytes, more than the limit of "
            "16777216 bytes") in text
    assert f"file={tmp_path / 'x.yaml'} reason=symlink loop" in text
    assert "(a symlink loop or a second link); not followed" in text
    # Reported once each, however often the folder is looked at.
    h.source.poll()
    h.source.poll()
    assert log_text(caplog).count("fifo.yaml") == 1
    # Serving went on meanwhile: a new Service still arrives, nothing was withdrawn, and the
    # loop was never held for long.
    write(tmp_path / "b.yaml", manifest("b", "10.96.0.2"))
    await h.wait(lambda: h.services() == {"default/a", "default/b"})
    assert h.withdrawn == []
    assert h.max_stall < 2.0, h.max_stall  # before: the walk never ended, or ~30 s per read


async def test_file_turned_unreadable_keeps_its_objects(
        tmp_path: Path, harness, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path / "a.yaml", manifest("a", "10.96.0.1"))
    write(tmp_path / "b.yaml", manifest("b", "10.96.0.2"))
    h = harness()
    await h.wait(lambda: h.services() == {"default/a", "default/b"})
    # A FIFO swapped in, then a file past the size limit, then a half-written save.
    os.unlink(tmp_path / "a.yaml")
    os.mkfifo(tmp_path / ".a.fifo")
    os.rename(tmp_path / ".a.fifo", tmp_path / "a.yaml")
    with open(tmp_path / ".b.big", "wb") as f:
        f.truncate(17 * 1024 * 1024)
    os.rename(tmp_path / ".b.big", tmp_path / "b.yaml")
    await h.wait(lambda: log_text(caplog).count("manifest skipped") >= 2)
    assert h.services() == {"default/a", "default/b"}
    assert h.withdrawn == []
    write(tmp_path / "b.yaml", "kind: Service\nmetadata: {name: b\n  bad: [")
    await h.wait(lambda: "cannot parse" in log_text(caplog))
    assert h.services() == {"default/a", "default/b"}
    # Repaired: served again, and said so.
    os.unlink(tmp_path / "a.yaml")
    write(tmp_path / "a.yaml", manifest("a", "10.96.0.1", "10.244.0.7"))
    await h.wait(lambda: h.state.services[NamespacedName("default", "a")]
                 .ports[0].endpoints[0].ip == "10.244.0.7")
    assert f"manifest readable again file={tmp_path / 'a.yaml'}" in log_text(caplog)
    assert h.withdrawn == []


async def test_folder_vanishing_keeps_everything(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    write(folder / "a.yaml", manifest("a", "10.96.0.1"))
    state = ClusterState()
    source = ManifestSource(folder, state, poll_interval=3600)
    task = asyncio.create_task(source.run())
    try:
        deadline = time.monotonic() + 5
        while NamespacedName("default", "a") not in state.services:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        os.rename(folder, tmp_path / "elsewhere")
        deadline = time.monotonic() + 5
        while "does not exist" not in log_text(caplog):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert NamespacedName("default", "a") in state.services
    finally:
        task.cancel()


async def test_large_valid_file_is_parsed_off_the_loop(tmp_path: Path, harness) -> None:
    # 300 Services in one file, each with 2000 annotations (kept by no model, but parsed):
    # parsing takes a while; the loop is held only while the few objects are applied to the
    # state, a small fraction of the parse.
    note = "  annotations:\n" + "".join(f"    a{n}: v{n}\n" for n in range(2000))
    docs = [manifest(f"s{i}", f"10.96.{i // 250}.{i % 250 + 1}").replace(
        "  namespace: default\n", "  namespace: default\n" + note, 1) for i in range(300)]
    data = "---\n".join(docs).encode()
    start = time.perf_counter()
    load_file(tmp_path / "big.yaml", data)
    parse_seconds = time.perf_counter() - start
    (tmp_path / "big.yaml").write_bytes(data)
    h = harness()
    await h.wait(lambda: len(h.state.services) == 300, timeout=120)
    assert h.max_stall < parse_seconds / 2, (h.max_stall, parse_seconds)


def shared_folder(folder: Path) -> None:
    """Four files for a first read shared with a child process. The child gets c.yaml (the
    largest), which does not parse after many valid documents, and d.yaml (the smallest, added
    to the lighter share), which holds an invalid object."""
    folder.mkdir(exist_ok=True)
    for name, count in (("a", 50), ("b", 30), ("c", 60)):
        write(folder / f"{name}.yaml", "---\n".join(
            manifest(f"{name}{i}", f"10.96.{ord(name)}.{i + 1}") for i in range(count)))
    with open(folder / "c.yaml", "a") as f:
        f.write("---\nkind: [Service\n")
    write(folder / "d.yaml", manifest("d0", "10.96.4.1") + "---\n"
          + manifest("d1", "10.96.4.2", ep="0.0.0.0"))
    child, _ = manifests.split_by_size([(p, p.stat().st_size) for p in folder.glob("*.yaml")])
    assert sorted(p.name for p in child) == ["c.yaml", "d.yaml"]


def read_folder(folder: Path, parallel: bool) -> tuple[ManifestSource, ClusterState]:
    state = ClusterState()
    source = ManifestSource(folder, state, use_inotify=False,
                            parallel_bytes=0 if parallel else 1 << 60)
    source.load_once()
    return source, state


async def test_a_first_read_shared_with_a_child_process_reports_as_one(
        tmp_path: Path, harness, caplog: pytest.LogCaptureFixture) -> None:
    # The daemon's way: the first read on a thread of the running loop forks the child.
    shared_folder(tmp_path)
    h = harness(parallel_bytes=0)
    await h.wait(lambda: "manifests loaded" in log_text(caplog))
    assert h.source.parallel_reads == 1
    shared = log_text(caplog)
    caplog.clear()
    _, alone = read_folder(tmp_path, parallel=False)
    # The same state as one process reads, and the same reports, each naming its file.
    assert h.state.services == alone.services
    assert len(alone.services) == 50 + 30 + 2  # c.yaml does not parse; d1 has no endpoints
    for text in (shared, log_text(caplog)):
        assert f"skipping invalid object file={tmp_path / 'd.yaml'}" in text
        assert f"manifest skipped; keeping its previous objects file={tmp_path / 'c.yaml'}" \
            f" reason=cannot parse" in text
    assert h.withdrawn == []


def test_a_reading_child_that_dies_costs_only_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    shared_folder(tmp_path)
    parent = os.getpid()
    real = manifests.read_one

    def killed_in_child(*args: Any, **kwargs: Any) -> manifests.Outcome:
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)  # the child dies mid-read
        return real(*args, **kwargs)

    monkeypatch.setattr(manifests, "read_one", killed_in_child)
    source, state = read_folder(tmp_path, parallel=True)
    assert source.parallel_reads == 1
    assert ("manifest reading process failed; reading its files here reason=killed by "
            "signal 9") in log_text(caplog)
    monkeypatch.undo()
    _, alone = read_folder(tmp_path, parallel=False)
    assert state.services == alone.services and len(state.services) == 82
    assert f"file={tmp_path / 'c.yaml'} reason=cannot parse" in log_text(caplog)


def test_no_process_to_share_the_read_with_reads_here(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # fork failing (EAGAIN under a process limit) cannot be had on demand as root: a stand-in.
    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    shared_folder(tmp_path)
    monkeypatch.setattr(os, "fork", no_fork)
    source, state = read_folder(tmp_path, parallel=True)
    assert source.parallel_reads == 1
    assert "cannot start a manifest reading process; reading its files here" in log_text(caplog)
    assert len(state.services) == 82

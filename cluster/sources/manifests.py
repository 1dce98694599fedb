"""The manifest-folder source: Services, EndpointSlices and Nodes from YAML/JSON files, live.

This module owns reading a folder (or one file) of manifests the way `kubectl apply -f DIR -R`
would find them, and turning edits into ClusterState events:

- files: *.yaml, *.yml, *.json, recursively; dotfiles and dot-directories (editor swap files,
  a ConfigMap volume's `..data` staging directory) and editor temp files (`x~`, `#x#`) are
  skipped. Symlinks are followed, so a ConfigMap volume's atomic `..data` swap is seen; each
  directory is read once (a visited set of device and inode), so a link back up the tree is
  reported as a loop, never followed. Only regular files are read (a FIFO or a device behind a
  manifest name is reported), each up to `max_file_bytes`.
- documents: multi-document YAML, JSON, `kind: List` and the typed lists kubectl prints
  (`ServiceList`, `EndpointSliceList`, `NodeList`, whose items may omit `kind`). A Node is
  optional; only the one named like this node (--hostname-override) is used, for its zone
  label and taints. Other kinds are ignored.
- following: inotify watches on every directory read, each set before the directory is listed
  (so nothing written after a listing goes unseen, and start-up needs one walk). The kernel
  names the file that changed, so an edit costs one file's read, not a scan; only directory
  events (a directory or a link to one came or went, a ConfigMap's `..data` swap, an
  overflowed event queue) walk the tree again. Other files in the folder (a README, the temp
  file of `sed -i`, an editor's probe file) are no manifests and cost nothing. A file is read
  when its writer closes it or renames it into place (not on each write, which would see it
  half written). Where inotify is unavailable or its watch limit is reached, the folder is polled
  every `poll_interval` seconds instead.
- work off the event loop: walking, reading and parsing run on a thread; only the resulting
  events are applied on the loop, so a slow disk or a huge file never stalls serving. The one
  exception is the common edit of a few small files (INLINE_FILES of INLINE_BYTES), read on
  the loop in well under a millisecond, which spares the thread hop. A first read of a large
  folder (PARALLEL_BYTES), where two or more CPUs may be used, shares the files with a forked
  child process; if it fails, this process reads its files too.
- errors are never deletions: an object that fails validation is reported (file, object, field)
  once per change of its file and skipped. A file that cannot be read or parsed (a YAML error,
  an editor's half-written save, too many open files, too large, not a regular file) keeps its
  previously loaded objects; so does everything under a directory that cannot be listed, and
  everything when the folder itself vanishes. Each such problem is logged once when it starts
  and once when it clears. Only a file that is really gone drops its objects.
- conflicts: two files defining the same object: the last in sorted path order wins, with a
  warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec
import yaml_rs

from kubeshim.cluster.bulk import gc_paused
from kubeshim.cluster.log import get_logger
from kubeshim.cluster.model import KINDS as MODEL_KINDS
from kubeshim.cluster.model import InvalidObject, KubeObject, NamespacedName, decode
from kubeshim.cluster.state import ClusterState, EventType, Kind, WatchEvent
from kubeshim.cluster.validation import ServiceCIDRs, validate_strict

log = get_logger("sources")

SUFFIXES = (".yaml", ".yml", ".json")
LIST_ITEM_KIND = {"ServiceList": "Service", "EndpointSliceList": "EndpointSlice",
                  "NodeList": "Node", "List": None}
KINDS: tuple[Kind, ...] = ("Service", "EndpointSlice", "Node")
# The largest manifest file read. The API server takes at most 3 MiB per request and etcd
# 1.5 MiB per object; 16 MiB leaves room for `kubectl get -A -o yaml` of ~50k Services.
MAX_FILE_BYTES = 16 * 1024 * 1024
# An edit of at most this many files of at most this size is read on the event loop.
INLINE_FILES = 4
INLINE_BYTES = 64 * 1024
# How soon a file that could not be read (EMFILE, EACCES, ...) is tried again under inotify.
RETRY_INTERVAL = 1.0

# A document end marker after the text: the parser then always returns a list of documents,
# even for one document that is itself a list.
_STREAM_END = "\n---\n"
# A marker after a line break: a pattern that starts with a literal is searched for that
# literal (10x faster on 25 MB than a multi-line `^`); one at the very start of the text
# needs no split.
_DOCUMENT_START = re.compile(r"\n---(?=[ \t\r\n]|$)")

ObjectKey = tuple[str, NamespacedName]  # (kind, namespace/name)
Signature = tuple[int, int, int]  # (mtime_ns, size, inode)
DirId = tuple[int, int]  # (st_dev, st_ino)


class Logger(Protocol):
    """Where reading a file reports what it skipped: the log, or a record of it."""

    def warning(self, event: str, **fields: Any) -> None: ...

    def debug(self, event: str, **fields: Any) -> None: ...


class ParseError(Exception):
    """A file that does not parse as a whole."""


class Unreadable(Exception):
    """A file that is not read: not a regular file, or too large. The message says why."""


@dataclass
class _File:
    signature: Signature
    objects: dict[ObjectKey, KubeObject]


def _ignored(name: str) -> bool:
    return (
        name.startswith(".") or name.endswith("~") or (name.startswith("#") and name.endswith("#"))
    )


def _is_manifest(name: str) -> bool:
    return not _ignored(name) and name.endswith(SUFFIXES)


def _signature(st: os.stat_result) -> Signature:
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def _os_reason(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    return e.strerror or str(e)


# --- walking the folder (runs on a thread) --------------------------------------------------


@dataclass
class Walk:
    """What one walk of the folder found."""

    files: dict[Path, Signature] = field(default_factory=dict)
    dirs: list[Path] = field(default_factory=list)  # directories read, to watch
    # Entries skipped, with the reason; their previous objects (if any) are kept.
    problems: dict[Path, str] = field(default_factory=dict)
    # Paths whose contents are unknown this time (unlisted directories, unreadable entries):
    # every known file at or under them keeps its objects.
    kept: list[Path] = field(default_factory=list)
    # inotify watch descriptor -> directory, for a walk that set watches.
    watched: dict[int, Path] = field(default_factory=dict)


def walk(root: Path, watch: Callable[[Path], None] | None = None) -> Walk:
    """The manifest files under `root` (or `root` itself) with their stat signatures.

    `watch` is called with each directory just before it is listed.
    """
    w = Walk()
    try:
        st = os.stat(root)
    except OSError as e:
        reason = "does not exist" if e.errno == errno.ENOENT else _os_reason(e)
        w.problems[root] = reason
        w.kept.append(root)
        return w
    if stat.S_ISREG(st.st_mode):
        w.files[root] = _signature(st)
        return w
    if not stat.S_ISDIR(st.st_mode):
        w.problems[root] = f"{_file_type(st.st_mode)}, not a file or directory"
        w.kept.append(root)
        return w
    visited: dict[DirId, Path] = {}
    stack: list[tuple[Path, os.stat_result]] = [(root, st)]
    while stack:
        d, dst = stack.pop()
        ident = (dst.st_dev, dst.st_ino)
        if ident in visited:
            w.problems[d] = (f"directory already read as {visited[ident]} (a symlink loop or a "
                             "second link); not followed")
            continue
        visited[ident] = d
        w.dirs.append(d)
        if watch is not None:
            watch(d)
        try:
            with os.scandir(d) as it:
                names = sorted(entry.name for entry in it)
        except OSError as e:
            w.problems[d] = f"cannot list directory: {_os_reason(e)}"
            w.kept.append(d)
            continue
        subdirs: list[tuple[Path, os.stat_result]] = []
        for name in names:
            if _ignored(name):
                continue
            path = d / name
            try:
                est = os.stat(path)  # follows symlinks
            except FileNotFoundError:
                continue  # vanished since the listing, or a dangling link: nothing to read
            except OSError as e:
                w.problems[path] = _os_reason(e)
                w.kept.append(path)
                continue
            if stat.S_ISDIR(est.st_mode):
                subdirs.append((path, est))
            elif name.endswith(SUFFIXES):
                if stat.S_ISREG(est.st_mode):
                    w.files[path] = _signature(est)
                else:
                    w.problems[path] = f"{_file_type(est.st_mode)}, not a regular file; skipped"
                    w.kept.append(path)
        stack.extend(reversed(subdirs))
    return w


def read_file(path: Path, limit: int) -> tuple[bytes, Signature]:
    """The bytes of one regular file of at most `limit` bytes, and its signature.

    Opened non-blocking, then checked on the descriptor: a FIFO or device swapped in after the
    walk cannot block the reader, and a file that grows past the limit while read is refused.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unreadable(f"{_file_type(st.st_mode)}, not a regular file; skipped")
        if st.st_size > limit:
            raise Unreadable(f"{st.st_size} bytes, more than the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - size) or 1):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise Unreadable(f"more than the limit of {limit} bytes")
        return b"".join(chunks), _signature(st)
    finally:
        os.close(fd)


# --- parsing (runs on a thread) ---------------------------------------------------------------


def parse_documents(path: Path, data: bytes) -> list[Any]:
    """The top-level documents of one file; raises ParseError when it does not parse.

    YAML goes through yaml-rs (Rust, YAML 1.2 core schema), about 15x faster than PyYAML's C
    loader on 10k Services. Like kubectl's YAML reader it refuses a mapping with a duplicate
    key, and it bounds alias expansion (a "billion laughs" file is an error, not a hang).
    Timestamps stay strings, as the API server's JSON has them.
    """
    try:
        if path.suffix == ".json":
            return [msgspec.json.decode(data)]
        return _yaml_documents(data.decode("utf-8-sig"))
    except (yaml_rs.YAMLDecodeError, msgspec.DecodeError, UnicodeDecodeError,
            RecursionError) as e:
        raise ParseError(str(e).replace("\n", " ")) from None


def _yaml_documents(text: str) -> list[Any]:
    """One parser call per document: the parser holds the interpreter lock for the whole
    call, so a file parsed in one call would hold up the event loop (a tenth of a second for
    10 MB). A `---` at the start of a line always starts a document (YAML 1.2 section 9.1.4:
    no scalar may contain it there), so the file splits there; a document that does not parse
    alone (a directive before its marker) is parsed with the whole file instead, which also
    gives an error the file's own line numbers."""
    starts = [m.start() + 1 for m in _DOCUMENT_START.finditer(text)]
    bounds = zip([0, *starts], [*starts, len(text)], strict=True)
    docs: list[Any] = []
    try:
        for begin, end in bounds:
            if begin < end:
                parsed = yaml_rs.loads(text[begin:end] + _STREAM_END, parse_datetime=False)
                docs.extend(doc for doc in parsed or () if doc is not None)
    except yaml_rs.YAMLDecodeError:
        parsed = yaml_rs.loads(text + _STREAM_END, parse_datetime=False)
        return [doc for doc in parsed or () if doc is not None]
    return docs


def _items(doc: Any, where: str, logger: Logger) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(kind, object) pairs of one document, unpacking lists."""
    if not isinstance(doc, Mapping):
        logger.warning("skipping document that is not an object", file=where,
                       type=type(doc).__name__)
        return
    kind = doc.get("kind")
    if kind in LIST_ITEM_KIND:
        default = LIST_ITEM_KIND[kind]
        for item in doc.get("items") or ():
            if isinstance(item, Mapping):
                yield item.get("kind") or default or "", item
            else:
                logger.warning("skipping list item that is not an object", file=where)
        return
    yield kind or "", doc


def load_file(path: Path, data: bytes, service_cidrs: ServiceCIDRs | None = None,
              loopback_endpoints: bool = True, logger: Logger = log
              ) -> dict[ObjectKey, KubeObject]:
    """The valid Services and EndpointSlices in one file; invalid objects are reported (to
    `logger`).

    Objects from files get the API server's own validation (names, address classes, the
    service CIDRs when known; see cluster/validation.py, loopback endpoints allowed by
    default for the lab): nothing validated them before kubeshim reads them.
    """
    objects: dict[ObjectKey, KubeObject] = {}
    where = str(path)
    for doc in parse_documents(path, data):
        for kind, raw in _items(doc, where, logger):
            if kind not in KINDS:
                logger.debug("ignoring object of another kind", file=where, kind=kind)
                continue
            try:
                obj = decode(kind, raw)
                validate_strict(obj, service_cidrs, loopback_endpoints)
            except InvalidObject as e:
                logger.warning(
                    "skipping invalid object",
                    file=where,
                    kind=kind,
                    object=e.name,
                    reason=e.reason,
                )
                continue
            key = (kind, obj.key)
            if key in objects:
                logger.warning(
                    "object defined twice in one file, the later wins",
                    file=where,
                    kind=kind,
                    object=str(obj.key),
                )
            objects[key] = obj
    return objects


# What became of one file: "loaded" (with its objects), "parse-failed" (the signature of the
# version that does not parse), "unreadable" (not a regular file, too large), or "os-error"
# (worth another look); the reason for all but the first.
Outcome = tuple[str, Signature, str, dict[ObjectKey, KubeObject]]
_NO_SIGNATURE: Signature = (0, 0, 0)


def read_one(path: Path, limit: int, service_cidrs: ServiceCIDRs | None,
             logger: Logger = log) -> Outcome:
    """Read, parse and validate one file."""
    signature = _NO_SIGNATURE
    try:
        data, signature = read_file(path, limit)
        return "loaded", signature, "", load_file(path, data, service_cidrs, logger=logger)
    except ParseError as e:
        return "parse-failed", signature, str(e), {}
    except Unreadable as e:
        return "unreadable", signature, str(e), {}
    except OSError as e:
        return "os-error", signature, _os_reason(e), {}


# --- reading in two processes -----------------------------------------------------------------
#
# YAML parsing holds the interpreter lock, so threads cannot share it. A first read of a large
# folder, where this process may use two or more CPUs, gives about half of the files (by size)
# to a forked child: it reads, parses and validates them as this process would, and hands back
# its outcomes in msgpack (each object encoded by msgspec with its own type), with what it would
# have logged. A child that fails in any way (killed, an error, a short result) costs nothing
# but time: this process then reads its files itself.

# A full read of at least this many bytes, in two or more files, is shared with a child.
PARALLEL_BYTES = 4 * 1024 * 1024
# The child's outcomes: (path, status, signature, reason, [(kind, object)], [(level, event,
# fields)]).
_Wire = list[tuple[str, str, Signature, str, list[tuple[str, msgspec.Raw]],
                   list[tuple[str, str, dict[str, Any]]]]]
_ENCODER = msgspec.msgpack.Encoder()
_DECODERS = {kind: msgspec.msgpack.Decoder(cls) for kind, cls in MODEL_KINDS.items()}


class _Recorder:
    """What reading a file would log, for the process that takes its outcome."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append(("warning", event, fields))

    def debug(self, event: str, **fields: Any) -> None:
        self.lines.append(("debug", event, fields))


def split_by_size(paths: list[tuple[Path, int]]) -> tuple[list[Path], list[Path]]:
    """Two groups of about equal bytes (largest first, each to the lighter group)."""
    groups: tuple[list[Path], list[Path]] = ([], [])
    sizes = [0, 0]
    for path, size in sorted(paths, key=lambda p: -p[1]):
        lighter = 0 if sizes[0] <= sizes[1] else 1
        groups[lighter].append(path)
        sizes[lighter] += size
    return groups


def _child(paths: list[Path], limit: int, service_cidrs: ServiceCIDRs | None, fd: int) -> None:
    """In the forked child: the outcomes of `paths` into `fd`, then exit (never returns)."""
    code = 70
    try:
        # Signals are the parent's to handle: the child just ends (uvloop's handlers would
        # report them through the parent's own wakeup pipe).
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        wire: list[Any] = []
        for path in paths:
            recorder = _Recorder()
            status, signature, reason, objects = read_one(path, limit, service_cidrs, recorder)
            wire.append((str(path), status, signature, reason,
                         [(kind, msgspec.Raw(_ENCODER.encode(obj)))
                          for (kind, _), obj in objects.items()], recorder.lines))
        with open(fd, "wb", closefd=False) as out:
            out.write(_ENCODER.encode(wire))
        code = 0
    finally:
        os._exit(code)


def _decode(data: bytes) -> dict[Path, Outcome]:
    outcomes: dict[Path, Outcome] = {}
    for path, status, signature, reason, objects, lines in msgspec.msgpack.decode(
            data, type=_Wire):
        for level, event, fields in lines:
            getattr(log, level)(event, **fields)
        decoded: dict[ObjectKey, KubeObject] = {}
        for kind, raw in objects:
            obj = _DECODERS[kind].decode(raw)
            decoded[(kind, obj.key)] = obj
        outcomes[Path(path)] = (status, signature, reason, decoded)
    return outcomes


def read_parallel(paths: list[Path], limit: int, service_cidrs: ServiceCIDRs | None,
                  child_paths: list[Path]) -> dict[Path, Outcome]:
    """The outcomes of `paths`, `child_paths` of them read by a forked child meanwhile."""
    in_child = set(child_paths)
    fd = os.memfd_create("kubeshim-manifests", os.MFD_CLOEXEC)
    try:
        try:
            pid = os.fork()
        except OSError as e:
            log.warning("cannot start a manifest reading process; reading its files here",
                        reason=_os_reason(e), files=len(child_paths))
            return {path: read_one(path, limit, service_cidrs) for path in paths}
        if pid == 0:
            _child(child_paths, limit, service_cidrs, fd)
        try:
            outcomes = {path: read_one(path, limit, service_cidrs) for path in paths
                        if path not in in_child}
        finally:
            _, status = os.waitpid(pid, 0)
        problem = "" if status == 0 else (
            f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
            else f"exit code {os.waitstatus_to_exitcode(status)}")
        if not problem:
            try:
                theirs = _decode(os.pread(fd, os.fstat(fd).st_size, 0))
                if set(theirs) != in_child:
                    problem = "an incomplete result"
            except Exception as e:  # its output is this program's: a bug, not bad input
                problem = f"an unreadable result ({e!r})"
        if problem:
            log.warning("manifest reading process failed; reading its files here",
                        reason=problem, files=len(child_paths))
            theirs = {path: read_one(path, limit, service_cidrs) for path in child_paths}
        outcomes.update(theirs)
        return {path: outcomes[path] for path in paths}
    finally:
        os.close(fd)


@dataclass
class _Read:
    """The outcome of one look at the folder, computed off the loop and applied on it."""

    walk: Walk | None  # set for a full walk
    loaded: dict[Path, _File] = field(default_factory=dict)
    parse_failed: dict[Path, Signature] = field(default_factory=dict)
    gone: set[Path] = field(default_factory=set)  # targeted paths that no longer exist
    problems: dict[Path, str] = field(default_factory=dict)
    retry: set[Path] = field(default_factory=set)  # transient failures worth another look
    rescan: bool = False  # a targeted path turned out to need a full walk


# --- the source -------------------------------------------------------------------------------


class ManifestSource:
    """Keeps `state` equal to the manifests under `path`."""

    def __init__(self, path: Path, state: ClusterState, *, poll_interval: float = 0.5,
                 max_file_bytes: int = MAX_FILE_BYTES, use_inotify: bool = True,
                 service_cidrs: ServiceCIDRs | None = None,
                 parallel_bytes: int = PARALLEL_BYTES) -> None:
        self.path = Path(path)
        self.state = state
        self.poll_interval = poll_interval
        self.max_file_bytes = max_file_bytes
        self.use_inotify = use_inotify
        self.service_cidrs = service_cidrs
        self.parallel_bytes = parallel_bytes
        self.parallel_reads = 0  # full reads shared with a child process
        self._files: dict[Path, _File] = {}
        # Every file's objects by key: the winner is the last path in sorted order.
        self._defs: dict[ObjectKey, dict[Path, KubeObject]] = {}
        self._merged: dict[ObjectKey, KubeObject] = {}
        self._withdrawn: dict[ObjectKey, KubeObject] = {}  # merged objects no file defines now
        self._conflicts: set[tuple[ObjectKey, Path]] = set()
        self._reported: dict[Path, str] = {}  # problems logged, until they clear
        self._pending: set[Path] = set()
        self._pending_full = False
        self._wake = asyncio.Event()
        self._inotify: Any = None
        self._watches: dict[int, Path] = {}  # inotify watch descriptor -> directory
        self._watched: set[Path] = set()  # the directories watched (and links followed to them)
        self._watch_limit: str | None = None  # why a watch could not be set (ENOSPC, ENOMEM)
        self._mask = 0
        self._outside: Path | None = None
        self.mode = "poll"
        # Full walks of the folder so far (start-up, directory events, polling, retries).
        self.walks = 0

    # --- entry points ---------------------------------------------------------------------------

    def load_once(self) -> None:
        """Read everything and make both kinds synced (for `kubeshim state` and startup)."""
        with gc_paused(freeze=True):
            self._apply(self._read(True, set()), initial=True)

    async def run(self) -> None:
        """Load, then follow file creation, edits and deletion until cancelled."""
        if not self.path.exists():
            log.warning(
                "manifest path does not exist (yet); serving nothing until it does",
                path=str(self.path),
            )
        if self.use_inotify:
            self._start_inotify()  # before the first walk, which sets the watches
        with gc_paused(freeze=True):  # bulk work: the first read of the whole folder
            self._apply(await asyncio.to_thread(self._read, True, set()), initial=True)
        if self._inotify is not None:
            self.mode = "inotify"
            asyncio.get_running_loop().add_reader(self._inotify.fileno(), self._on_inotify)
        log.info("following manifests", path=str(self.path), mode=self.mode)
        try:
            while True:
                if self._inotify is None:
                    await asyncio.sleep(self.poll_interval)
                    self._pending_full = True
                else:
                    await self._wake.wait()
                self._wake.clear()
                full, paths = self._pending_full, self._pending
                self._pending_full, self._pending = False, set()
                try:
                    if not full and self._small(paths):
                        result = self._read(full, paths)  # no thread hop for a small edit
                    else:
                        result = await asyncio.to_thread(self._read, full, paths)
                    self._apply(result)
                except Exception:  # keep following; the last good state keeps serving
                    log.error("manifest read failed", exc_info=True, path=str(self.path))
        finally:
            self._stop_inotify()

    @staticmethod
    def _small(paths: set[Path]) -> bool:
        """A few small files: read them on the loop (well under a millisecond each), sparing
        the thread hop and the wait for the interpreter lock that cost milliseconds."""
        if len(paths) > INLINE_FILES:
            return False
        for path in paths:
            try:
                if os.stat(path).st_size > INLINE_BYTES:
                    return False
            except OSError:
                pass  # gone or unreadable: _read reports it without reading
        return True

    def poll(self) -> None:
        """One full look at the folder, on the calling thread."""
        self._apply(self._read(True, set()))

    # --- reading (on a thread; reads self._files, never writes it) ------------------------------

    def _read(self, full: bool, paths: set[Path]) -> _Read:
        candidates: dict[Path, Signature] = {}
        if full:
            result = _Read(self._walk())
            assert result.walk is not None
            candidates = result.walk.files
            result.problems.update(result.walk.problems)
            result.retry.update(result.walk.kept)
        else:
            result = _Read(None)
            for path in paths:
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    result.gone.add(path)
                    continue
                except OSError as e:
                    result.problems[path] = _os_reason(e)
                    result.retry.add(path)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    result.rescan = True  # a directory under a manifest's name: walk it
                elif stat.S_ISREG(st.st_mode):
                    candidates[path] = _signature(st)
                else:
                    result.problems[path] = f"{_file_type(st.st_mode)}, not a regular file; skipped"
        todo = [(path, signature) for path, signature in candidates.items()
                if (known := self._files.get(path)) is None or known.signature != signature]
        to_read = [path for path, _ in todo]
        if (full and len(todo) > 1 and sum(sig[1] for _, sig in todo) >= self.parallel_bytes
                and len(os.sched_getaffinity(0)) > 1):
            self.parallel_reads += 1
            child_paths, _ = split_by_size([(path, sig[1]) for path, sig in todo])
            outcomes = read_parallel(to_read, self.max_file_bytes, self.service_cidrs,
                                     child_paths)
        else:
            outcomes = {path: read_one(path, self.max_file_bytes, self.service_cidrs)
                        for path in to_read}
        for path, (status, signature, reason, objects) in outcomes.items():
            if status == "loaded":
                result.loaded[path] = _File(signature, objects)
            elif status == "parse-failed":
                result.problems[path] = f"cannot parse: {reason}"
                result.parse_failed[path] = signature
            elif status == "unreadable":
                result.problems[path] = reason
            else:
                result.problems[path] = f"cannot read: {reason}"
                result.retry.add(path)
        return result

    def _walk(self) -> Walk:
        """Walk the folder, watching each directory before it is listed (under inotify)."""
        if self._inotify is None:
            return walk(self.path)
        watched: dict[int, Path] = {}
        w = walk(self.path, lambda d: self._watch(d, watched))
        if not w.dirs:
            # One file, or a folder not there yet: its parent's events tell when that changes.
            # Look once more now that they do.
            self._watch(self.path.parent, watched)
            w = walk(self.path)
        w.watched = watched
        return w

    def _watch(self, d: Path, watched: dict[int, Path]) -> None:
        """Watch one directory (on the walking thread; the loop's view of the watches only
        grows here, so an event of a new watch is known before the walk ends)."""
        if self._watch_limit is not None or self._inotify is None:
            return
        try:
            wd = self._inotify.add_watch(d, self._mask)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.ENOMEM):
                self._watch_limit = _os_reason(e)
            return  # otherwise gone since it was found: the event that removed it says so
        watched[wd] = d
        self._watches[wd] = d
        self._watched.add(d)

    # --- applying (on the loop) -------------------------------------------------------------------

    def _apply(self, result: _Read, initial: bool = False) -> None:
        removed: list[Path] = []
        if result.walk is not None:
            self.walks += 1
            kept = result.walk.kept
            for path in self._files:
                if path not in result.walk.files and path not in result.problems and not any(
                        path == k or path.is_relative_to(k) for k in kept):
                    removed.append(path)
            self._sync_watches(result.walk)
        else:
            removed = [p for p in result.gone if p in self._files]
        for path, signature in result.parse_failed.items():
            # Keep the objects the file last parsed to; do not parse this version again.
            self._files.setdefault(path, _File(signature, {})).signature = signature
        touched: set[ObjectKey] = set()
        for path in removed:
            log.info("manifest file removed", file=str(path))
            touched |= self._set_file(path, None)
        for path, entry in result.loaded.items():
            touched |= self._set_file(path, entry)
        self._report(result)
        if initial:
            self._withdrawn.clear()
            # The Node and slices first: a Service then appears once, with its endpoints and
            # this node's topology, not twice.
            for kind in ("Node", "EndpointSlice", "Service"):
                self.state.replace(kind, [o for (k, _), o in self._merged.items() if k == kind])
            log.info("manifests loaded", path=str(self.path), files=len(self._files),
                     objects=len(self._merged))
        elif touched:
            events = self._events(touched)
            if events:
                self.state.apply(events)
        if result.rescan:
            self._pending_full = True
            self._wake.set()
        if result.retry and self._inotify is not None:
            asyncio.get_running_loop().call_later(RETRY_INTERVAL, self._queue, result.retry)

    def _set_file(self, path: Path, entry: _File | None) -> set[ObjectKey]:
        """Replace one file's objects; returns the keys whose definitions changed."""
        old = self._files.pop(path, None)
        if entry is not None:
            self._files[path] = entry
        touched: set[ObjectKey] = set()
        for key in old.objects if old is not None else ():
            if entry is None or key not in entry.objects:
                defs = self._defs[key]
                del defs[path]
                if not defs:
                    del self._defs[key]
                touched.add(key)
        for key, obj in entry.objects.items() if entry is not None else ():
            defs = self._defs.setdefault(key, {})
            if defs.get(path) != obj:
                defs[path] = obj
                touched.add(key)
        return self._merge(touched)

    def _merge(self, keys: Iterable[ObjectKey]) -> set[ObjectKey]:
        changed: set[ObjectKey] = set()
        for key in keys:
            defs = self._defs.get(key)
            if not defs:
                if (gone := self._merged.pop(key, None)) is not None:
                    self._withdrawn[key] = gone
                    changed.add(key)
                continue
            paths = sorted(defs)
            winner = paths[-1]
            for path in paths[1:]:
                if (key, path) not in self._conflicts:
                    self._conflicts.add((key, path))
                    log.warning("object defined in two files, the later path wins", kind=key[0],
                                object=str(key[1]), file=str(path), overrides=str(paths[0]))
            if self._merged.get(key) != defs[winner]:
                self._merged[key] = defs[winner]
                self._withdrawn.pop(key, None)  # moved to another file in the same batch
                changed.add(key)
        return changed

    def _events(self, touched: set[ObjectKey]) -> list[WatchEvent]:
        deleted = [WatchEvent(EventType.DELETED, self._withdrawn.pop(key))
                   for key in touched if key in self._withdrawn]
        modified = [WatchEvent(EventType.MODIFIED, self._merged[key])
                    for key in touched if key in self._merged]
        self._withdrawn.clear()
        return deleted + modified

    def _report(self, result: _Read) -> None:
        """Log each problem once when it starts and once when it clears."""
        for path, reason in result.problems.items():
            if self._reported.get(path) != reason:
                self._reported[path] = reason
                known = self._files.get(path)
                log.warning("manifest skipped; keeping its previous objects", file=str(path),
                            reason=reason, kept=len(known.objects) if known else 0)
        if result.walk is not None:
            cleared = [p for p in self._reported if p not in result.problems]
        else:
            cleared = [p for p in (*result.loaded, *result.gone)
                       if p in self._reported and p not in result.problems]
        for path in cleared:
            del self._reported[path]
            log.info("manifest readable again", file=str(path))

    # --- inotify --------------------------------------------------------------------------------

    def _start_inotify(self) -> None:
        try:
            from inotify_simple import INotify
        except ImportError:
            log.warning("inotify_simple not installed; polling the manifest folder",
                        interval=self.poll_interval)
            return
        try:
            self._inotify = INotify(nonblocking=True)
        except OSError as e:
            log.warning("inotify unavailable; polling the manifest folder",
                        reason=_os_reason(e), interval=self.poll_interval)
            return
        from inotify_simple import flags

        self._mask = (flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM | flags.CREATE
                      | flags.DELETE | flags.ATTRIB | flags.DELETE_SELF | flags.MOVE_SELF)
        self._watches, self._watched, self._watch_limit = {}, set(), None

    def _stop_inotify(self) -> None:
        if self._inotify is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None

    def _sync_watches(self, walked: Walk) -> None:
        """After a walk: drop the watches of directories it no longer found, or fall back to
        polling when the watch limit was reached."""
        if self._inotify is None:
            return
        if self._watch_limit is not None:
            log.warning("inotify watch limit reached; polling the manifest folder",
                        reason=self._watch_limit, interval=self.poll_interval,
                        hint="raise fs.inotify.max_user_watches")
            self._stop_inotify()
            self.mode = "poll"
            self._wake.set()
            return
        self._outside = None if walked.dirs else self.path.parent
        for wd in self._watches.keys() - walked.watched.keys():
            with contextlib.suppress(OSError):
                self._inotify.rm_watch(wd)
        self._watches = dict(walked.watched)
        self._watched = set(walked.watched.values())

    def _on_inotify(self) -> None:
        from inotify_simple import flags

        try:
            events = self._inotify.read(timeout=0)
        except OSError as e:
            log.error("reading inotify events failed; polling the manifest folder",
                      reason=_os_reason(e))
            self._stop_inotify()
            self.mode = "poll"
            self._wake.set()
            return
        for ev in events:
            if ev.mask & flags.Q_OVERFLOW:
                self._pending_full = True
                continue
            d = self._watches.get(ev.wd)
            if d is None:
                continue
            if ev.mask & (flags.DELETE_SELF | flags.MOVE_SELF | flags.IGNORED):
                self._pending_full = True
            elif d == self._outside:
                # The parent of a single file or of a folder not there yet.
                if ev.name == self.path.name:
                    self._pending_full = True
            elif _is_manifest(ev.name) and not ev.mask & flags.ISDIR:
                self._pending.add(d / ev.name)
            elif ev.name.startswith("..") or not _ignored(ev.name) and (
                    ev.mask & flags.ISDIR or self._directory_link(d / ev.name)):
                # A directory (or a link to one) came or went, or a ConfigMap volume swapped
                # its `..data` link: walk again.
                self._pending_full = True
            # Any other name is no manifest (a README, `sed -i`'s temp file, an editor's swap
            # or probe file, a dot-directory): nothing to read.
        if self._pending or self._pending_full:
            self._wake.set()

    def _directory_link(self, path: Path) -> bool:
        """A link to a directory: one walked before (now removed or replaced) or one now."""
        return path in self._watched or os.path.isdir(path)

    def _queue(self, paths: set[Path]) -> None:
        for path in paths:
            if path == self.path or path in self._files or path.is_dir():
                self._pending_full = True
            else:
                self._pending.add(path)
        self._wake.set()

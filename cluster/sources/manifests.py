"""The manifest-folder source: Services, EndpointSlices and Nodes from YAML/JSON files, live.

This module owns reading a folder (or one file) of manifests the way `kubectl apply -f DIR -R`
would find them, and turning edits into ClusterState events:

- files: *.yaml, *.yml, *.json, recursively; dotfiles and dot-directories (editor swap files,
  a ConfigMap volume's `..data` staging directory) and editor temp files (`x~`, `#x#`) are
  skipped. Symlinks are followed, so a ConfigMap volume's atomic `..data` swap is seen.
- documents: multi-document YAML, JSON, `kind: List` and the typed lists kubectl prints
  (`ServiceList`, `EndpointSliceList`, `NodeList`, whose items may omit `kind`). A Node is
  optional; only the one named like this node (--hostname-override) is used, for its zone
  label and taints. Other kinds are ignored.
- following: a poll of (mtime, size, inode) every `poll_interval` seconds. Polling was chosen
  over inotify: it sees atomic renames, symlink swaps and edits in new subdirectories without
  watch bookkeeping, and costs one stat per file per tick (about 10 us each).
- errors: an object that fails validation is reported (file, object, reason) once per change
  of its file and skipped. A file that fails to parse as a whole (a YAML error, often an
  editor's half-written save) is reported and its previously loaded objects are KEPT until it
  parses again, so a bad save never drops a serving Service. A deleted file drops its objects.
- conflicts: two files defining the same object: the last in sorted path order wins, with a
  warning.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import yaml

from kubeshim.cluster.log import get_logger
from kubeshim.cluster.model import InvalidObject, KubeObject, NamespacedName, decode
from kubeshim.cluster.state import ClusterState, EventType, Kind, WatchEvent

log = get_logger("sources")

SUFFIXES = (".yaml", ".yml", ".json")
LIST_ITEM_KIND = {"ServiceList": "Service", "EndpointSliceList": "EndpointSlice",
                  "NodeList": "Node", "List": None}
KINDS: tuple[Kind, ...] = ("Service", "EndpointSlice", "Node")

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

ObjectKey = tuple[str, NamespacedName]  # (kind, namespace/name)
Signature = tuple[int, int, int]  # (mtime_ns, size, inode)


class ParseError(Exception):
    """A file that does not parse as a whole."""


@dataclass
class _File:
    signature: Signature
    objects: dict[ObjectKey, KubeObject]


def _ignored(name: str) -> bool:
    return (
        name.startswith(".") or name.endswith("~") or (name.startswith("#") and name.endswith("#"))
    )


def discover(root: Path) -> dict[Path, Signature]:
    """The manifest files under `root` (or `root` itself) with their stat signatures."""
    found: dict[Path, Signature] = {}

    def add(path: Path) -> None:
        try:
            st = path.stat()
        except OSError:  # vanished between listing and stat
            return
        found[path] = (st.st_mtime_ns, st.st_size, st.st_ino)

    if root.is_file():
        add(root)
        return found
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _ignored(d))
        for name in filenames:
            if not _ignored(name) and name.endswith(SUFFIXES):
                add(Path(dirpath, name))
    return found


def parse_documents(path: Path, data: bytes) -> list[Any]:
    """The top-level documents of one file; raises ParseError when it does not parse."""
    try:
        if path.suffix == ".json":
            return [msgspec.json.decode(data)]
        return [doc for doc in yaml.load_all(data, Loader=_Loader) if doc is not None]
    except (yaml.YAMLError, msgspec.DecodeError, UnicodeDecodeError) as e:
        raise ParseError(str(e).replace("\n", " ")) from None


def _items(doc: Any, where: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(kind, object) pairs of one document, unpacking lists."""
    if not isinstance(doc, Mapping):
        log.warning("skipping document that is not an object", file=where, type=type(doc).__name__)
        return
    kind = doc.get("kind")
    if kind in LIST_ITEM_KIND:
        default = LIST_ITEM_KIND[kind]
        for item in doc.get("items") or ():
            if isinstance(item, Mapping):
                yield item.get("kind") or default or "", item
            else:
                log.warning("skipping list item that is not an object", file=where)
        return
    yield kind or "", doc


def load_file(path: Path, data: bytes) -> dict[ObjectKey, KubeObject]:
    """The valid Services and EndpointSlices in one file; invalid objects are reported."""
    objects: dict[ObjectKey, KubeObject] = {}
    for doc in parse_documents(path, data):
        for kind, raw in _items(doc, str(path)):
            if kind not in KINDS:
                log.debug("ignoring object of another kind", file=str(path), kind=kind)
                continue
            try:
                obj = decode(kind, raw)
            except InvalidObject as e:
                log.warning(
                    "skipping invalid object",
                    file=str(path),
                    kind=kind,
                    object=e.name,
                    reason=e.reason,
                )
                continue
            if (kind, obj.key) in objects:
                log.warning(
                    "object defined twice in one file, the later wins",
                    file=str(path),
                    kind=kind,
                    object=str(obj.key),
                )
            objects[(kind, obj.key)] = obj
    return objects


class ManifestSource:
    """Keeps `state` equal to the manifests under `path`."""

    def __init__(self, path: Path, state: ClusterState, *, poll_interval: float = 0.5) -> None:
        self.path = Path(path)
        self.state = state
        self.poll_interval = poll_interval
        self._files: dict[Path, _File] = {}
        self._merged: dict[ObjectKey, KubeObject] = {}
        self._conflicts: set[tuple[ObjectKey, Path]] = set()

    def load_once(self) -> None:
        """Read everything and make both kinds synced (for `kubeshim state` and startup)."""
        self._scan()
        # The Node and slices first: a Service then appears once, with its endpoints and
        # this node's topology, not twice.
        for kind in ("Node", "EndpointSlice", "Service"):
            self.state.replace(kind, [o for (k, _), o in self._merged.items() if k == kind])
        log.info(
            "manifests loaded",
            path=str(self.path),
            files=len(self._files),
            objects=len(self._merged),
        )

    async def run(self) -> None:
        """Load, then follow file creation, edits and deletion until cancelled."""
        if not self.path.exists():
            log.warning(
                "manifest path does not exist (yet); serving nothing until it does",
                path=str(self.path),
            )
        self.load_once()
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self.poll()
            except Exception:  # keep following the folder; the last good state keeps serving
                log.error("manifest poll failed", exc_info=True, path=str(self.path))

    def poll(self) -> None:
        """One look at the folder: apply what changed since the last look."""
        before = self._merged
        if not self._scan():
            return
        events = [
            WatchEvent(EventType.DELETED, obj)
            for key, obj in before.items()
            if key not in self._merged
        ]
        events += [
            WatchEvent(EventType.MODIFIED, obj)
            for key, obj in self._merged.items()
            if before.get(key) != obj
        ]
        if events:
            self.state.apply(events)

    # --- internals ------------------------------------------------------------------------

    def _scan(self) -> bool:
        """Re-read changed files; True if the set of loaded objects may have changed."""
        seen = discover(self.path) if self.path.exists() else {}
        changed = False
        for path in [p for p in self._files if p not in seen]:
            del self._files[path]
            log.info("manifest file removed", file=str(path))
            changed = True
        for path, signature in seen.items():
            known = self._files.get(path)
            if known is not None and known.signature == signature:
                continue
            try:
                objects = load_file(path, path.read_bytes())
            except (ParseError, OSError) as e:
                # Keep the objects the file last parsed to (see the module comment).
                kept = len(known.objects) if known else 0
                log.warning(
                    "cannot parse manifest file; keeping its previous objects",
                    file=str(path),
                    reason=str(e),
                    kept=kept,
                )
                if known is not None:
                    known.signature = signature
                else:
                    self._files[path] = _File(signature, {})
                continue
            self._files[path] = _File(signature, objects)
            changed = True
        if changed:
            self._merge()
        return changed

    def _merge(self) -> None:
        merged: dict[ObjectKey, KubeObject] = {}
        owner: dict[ObjectKey, Path] = {}
        for path in sorted(self._files):
            for key, obj in self._files[path].objects.items():
                if key in owner and (key, path) not in self._conflicts:
                    self._conflicts.add((key, path))
                    log.warning(
                        "object defined in two files, the later path wins",
                        kind=key[0],
                        object=str(key[1]),
                        file=str(path),
                        overrides=str(owner[key]),
                    )
                merged[key] = obj
                owner[key] = path
        self._merged = merged

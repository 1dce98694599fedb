"""The API-server source: list + watch of Services, EndpointSlices and this node's Node.

This module owns the client side of the Kubernetes list/watch protocol (the shape of client-go's
Reflector), one loop per kind, all namespaces, no label selector (DNS needs headless slices too;
ClusterState decides what the proxy skips). The Node is watched as kube-proxy watches it: only
this node's own object, by the field selector metadata.name=<node name>. An identity that may
not read Nodes gets one clear error and Services and EndpointSlices are served all the same.

- list, paginated with `limit`/`continue`; a 410 on a continue token (the snapshot was compacted)
  restarts the list; the full result goes to `ClusterState.replace`, which emits the deletes of
  whatever vanished;
- watch from the list's resourceVersion with bookmarks; every event advances the
  resourceVersion only after it was applied, so a reconnect resumes exactly after the last
  applied event (nothing lost, nothing applied twice);
- 410 Gone (an HTTP 410 or an ERROR event carrying a Status with code 410) means the
  resourceVersion was compacted: relist;
- any other failure: reconnect after exponential backoff with full jitter; a stream that sends no
  byte for `stall_timeout` (bookmarks included) is treated as dead and restarted;
- an object that fails to decode or validate is logged by name and skipped; the rest apply.
  A MODIFIED object that turned invalid leaves its last valid version in place; a DELETED one
  is deleted by its key all the same.
"""

from __future__ import annotations

import asyncio
import gc
import random
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from kubeshim.cluster.bulk import gc_paused
from kubeshim.cluster.log import get_logger
from kubeshim.cluster.model import (
    EndpointSlice,
    InvalidObject,
    KubeObject,
    Node,
    ObjectMeta,
    Service,
    decode,
    validate,
)
from kubeshim.cluster.sources.kubeconfig import ClientConfig
from kubeshim.cluster.state import ClusterState, EventType, Kind, WatchEvent

log = get_logger("sources")


@dataclass(frozen=True)
class Resource:
    kind: Kind
    path: str
    group: str
    plural: str


RESOURCES: dict[Kind, Resource] = {
    "Service": Resource("Service", "/api/v1/services", "", "services"),
    "EndpointSlice": Resource(
        "EndpointSlice",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "discovery.k8s.io",
        "endpointslices",
    ),
    "Node": Resource("Node", "/api/v1/nodes", "", "nodes"),
}


# --- wire envelopes -------------------------------------------------------------------------


class _Status(msgspec.Struct):
    """meta/v1 Status, as sent in error bodies and ERROR watch events."""

    kind: str = ""
    code: int = 0
    reason: str = ""
    message: str = ""


class _ListMeta(msgspec.Struct, rename="camel", frozen=True):
    resource_version: str = ""
    continue_: str = msgspec.field(default="", name="continue")


class _RawList(msgspec.Struct):
    metadata: _ListMeta = _ListMeta()
    items: list[msgspec.Raw] | None = None


class _ServiceList(msgspec.Struct):
    metadata: _ListMeta = _ListMeta()
    items: list[Service] | None = None


class _EndpointSliceList(msgspec.Struct):
    metadata: _ListMeta = _ListMeta()
    items: list[EndpointSlice] | None = None


class _NodeList(msgspec.Struct):
    metadata: _ListMeta = _ListMeta()
    items: list[Node] | None = None


class _Head(msgspec.Struct):
    """Just enough of any object to name it and know its resourceVersion."""

    metadata: ObjectMeta = ObjectMeta()


class _Event(msgspec.Struct):
    type: str
    object: msgspec.Raw


_raw_list = msgspec.json.Decoder(_RawList)
_typed_list: dict[Kind, msgspec.json.Decoder[Any]] = {
    "Service": msgspec.json.Decoder(_ServiceList),
    "EndpointSlice": msgspec.json.Decoder(_EndpointSliceList),
    "Node": msgspec.json.Decoder(_NodeList),
}
_event = msgspec.json.Decoder(_Event)
_EVENT_TYPES = frozenset(EventType.__members__)
_head = msgspec.json.Decoder(_Head)
_status = msgspec.json.Decoder(_Status)


# --- errors ---------------------------------------------------------------------------------


class Gone(Exception):
    """410: the resourceVersion we asked for has been compacted away; relist."""


class StreamStalled(Exception):
    pass


class APIError(Exception):
    def __init__(self, code: int, message: str, reason: str = "") -> None:
        super().__init__(f"{code} {reason}: {message}".strip())
        self.code = code
        self.message = message
        self.reason = reason


def _parse_status(body: bytes, code: int) -> _Status:
    try:
        return _status.decode(body)
    except msgspec.MsgspecError:
        return _Status(code=code, message=body[:200].decode(errors="replace").strip())


# --- the source -----------------------------------------------------------------------------


class APISource:
    """Keeps `state` equal to the API server's Services and EndpointSlices."""

    def __init__(
        self,
        client: ClientConfig,
        state: ClusterState,
        *,
        watch_timeout: int = 300,
        stall_timeout: float = 120.0,
        page_size: int = 500,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        connect_timeout: float = 10.0,
        kinds: tuple[Kind, ...] | None = None,
    ) -> None:
        """`kinds` defaults to Services and EndpointSlices, plus the Node named
        `state.node_name` when that is set. `watch_timeout`: timeoutSeconds asked of each
        watch (randomised up to 2x, like client-go, so watches of many clients do not end
        together). `stall_timeout`: a watch that sends no byte for this long is restarted;
        kube-apiserver sends a bookmark about once a minute, so 120 s means two missed
        bookmarks.
        """
        self.client = client
        self.state = state
        self.watch_timeout = watch_timeout
        self.stall_timeout = stall_timeout
        self.page_size = page_size
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.connect_timeout = connect_timeout
        default: tuple[Kind, ...] = ("Service", "EndpointSlice")
        self.kinds: tuple[Kind, ...] = kinds if kinds is not None else (
            (*default, "Node") if state.node_name else default)
        # kube-proxy's node informer: fieldSelector=metadata.name=<node name>.
        self._selectors: dict[Kind, dict[str, str]] = {
            "Node": {"fieldSelector": f"metadata.name={state.node_name}"}}
        self._forbidden_reported: set[Kind] = set()
        # The last resourceVersion applied per kind: where a reconnecting watch resumes.
        self.resource_versions: dict[Kind, str] = {}
        self._need_consistent_list: set[Kind] = set()

    async def run(self) -> None:
        """List and watch every kind until cancelled."""
        connector = aiohttp.TCPConnector(limit=0, ssl=self.client.ssl or True)
        async with aiohttp.ClientSession(connector=connector) as session, asyncio.TaskGroup() as tg:
            for kind in self.kinds:
                tg.create_task(self._reflect(session, RESOURCES[kind]))

    # --- the loop of one kind ---------------------------------------------------------------

    async def _reflect(self, session: aiohttp.ClientSession, res: Resource) -> None:
        attempt = 0
        while True:
            verb = "watch" if res.kind in self.resource_versions else "list"
            try:
                if verb == "list":
                    await self._list(session, res)
                    attempt = 0
                    verb = "watch"
                if await self._watch(session, res):
                    attempt = 0
                    continue  # the server ended the watch (timeoutSeconds): watch again
                # Ended at once without a byte: back off rather than spin.
                log.debug("watch ended without data", resource=res.plural)
            except Gone:
                log.info(
                    "resource version expired, relisting",
                    resource=res.plural,
                    resource_version=self.resource_versions.pop(res.kind, ""),
                )
                self._need_consistent_list.add(res.kind)
                continue
            except APIError as e:
                self._log_api_error(e, verb, res)
            except StreamStalled:
                log.warning(
                    "watch stalled, restarting",
                    resource=res.plural,
                    idle_seconds=self.stall_timeout,
                    resource_version=self.resource_versions.get(res.kind, ""),
                )
            except aiohttp.ClientConnectorCertificateError as e:
                log.error(
                    "TLS verification of the API server failed: its certificate does not "
                    "verify against the configured CA",
                    server=self.client.server,
                    credentials=self.client.source,
                    error=str(e.certificate_error),
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                log.warning(
                    "API connection failed",
                    verb=verb,
                    resource=res.plural,
                    server=self.client.server,
                    error=_describe(e),
                )
            except Exception:  # a bug must not end the watch for good: report, back off, retry
                log.error(
                    "unexpected error in list/watch", exc_info=True, verb=verb, resource=res.plural
                )
            # Full jitter (AWS architecture blog, "Exponential Backoff And Jitter").
            delay = random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))
            attempt += 1
            await asyncio.sleep(delay)

    def _log_api_error(self, e: APIError, verb: str, res: Resource) -> None:
        if e.code == 401:
            log.error(
                "authentication failed: the API server rejected the credentials",
                server=self.client.server,
                credentials=self.client.source,
                message=e.message,
            )
        elif e.code == 403 and res.kind == "Node":
            # Nodes are optional: say it once, serve Services without topology and health
            # eligibility, and keep retrying (RBAC may be fixed while running).
            if res.kind not in self._forbidden_reported:
                self._forbidden_reported.add(res.kind)
                log.error(
                    f'forbidden: cannot {verb} resource "nodes" in API group "" at the cluster '
                    "scope; serving Services without this node's topology labels and taints "
                    "(grant get/list/watch on nodes, see deploy/rbac.yaml)",
                    verb=verb,
                    resource=res.plural,
                    node=self.state.node_name,
                    server=self.client.server,
                    credentials=self.client.source,
                    message=e.message,
                )
            else:
                log.debug("nodes still forbidden", verb=verb, node=self.state.node_name)
        elif e.code == 403:
            scope = (
                f'cannot {verb} resource "{res.plural}" in API group "{res.group}"'
                " at the cluster scope"
            )
            log.error(
                f"forbidden: {scope}",
                verb=verb,
                resource=res.plural,
                group=res.group,
                server=self.client.server,
                credentials=self.client.source,
                message=e.message,
            )
        else:
            log.warning(
                "API request failed",
                verb=verb,
                resource=res.plural,
                code=e.code,
                reason=e.reason,
                message=e.message,
            )

    # --- HTTP -----------------------------------------------------------------------------

    async def _get(
        self,
        session: aiohttp.ClientSession,
        res: Resource,
        params: dict[str, str],
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        headers = {"Accept": "application/json"}
        if auth := await self.client.authorization():
            headers["Authorization"] = auth
        resp = await session.get(
            self.client.server + res.path,
            params=params,
            headers=headers,
            timeout=timeout,
            server_hostname=self.client.tls_server_name,
        )
        if resp.status != 200:
            async with resp:
                body = await resp.read()
            status = _parse_status(body, resp.status)
            if resp.status == 410:
                raise Gone(status.message)
            raise APIError(resp.status, status.message or resp.reason or "", status.reason)
        return resp

    async def _list(self, session: aiohttp.ClientSession, res: Resource) -> None:
        # Like client-go's Reflector: the first list may be served from the API server's watch
        # cache (resourceVersion=0, cheap for the server when every node lists at once); a
        # relist after 410 Gone asks for a consistent read (no resourceVersion), since the
        # cache was evidently behind. A continue page must not carry a resourceVersion.
        first = {"limit": str(self.page_size), **self._selectors.get(res.kind, {})}
        if res.kind not in self._need_consistent_list:
            first["resourceVersion"] = "0"
        objects: list[KubeObject] = []
        params = dict(first)
        timeout = aiohttp.ClientTimeout(sock_connect=self.connect_timeout, sock_read=60)
        while True:
            try:
                async with await self._get(session, res, params, timeout) as resp:
                    body = await resp.read()
            except Gone as e:
                if "continue" not in params:  # a 410 on a fresh list: an error, back off
                    raise APIError(410, str(e), "Gone") from None
                # The continue token outlived its snapshot (compaction): list from scratch.
                log.info("list continue token expired, restarting list", resource=res.plural)
                objects.clear()
                params = dict(first)
                continue
            with gc_paused():
                meta = decode_list(res.kind, body, objects)
            if not meta.continue_:
                break
            params = {"limit": str(self.page_size), "continue": meta.continue_,
                      **self._selectors.get(res.kind, {})}
        with gc_paused():
            self.state.replace(res.kind, objects)
        count = len(objects)
        del objects
        # The listed objects live until replaced and hold no cycles. Freezing moves them out
        # of the collector's generations: a full collection would otherwise rescan them all
        # (10k Services x 10 endpoints: ~0.4 s, a stall for every connection the proxy
        # serves). Replaced objects are still freed by reference counting.
        gc.freeze()
        self.resource_versions[res.kind] = meta.resource_version
        if res.kind in self._forbidden_reported:
            self._forbidden_reported.discard(res.kind)
            log.info("nodes readable again", node=self.state.node_name)
        log.info(
            "listed",
            resource=res.plural,
            count=count,
            resource_version=meta.resource_version,
        )

    async def _watch(self, session: aiohttp.ClientSession, res: Resource) -> bool:
        """Watch from the last resourceVersion until the server ends the stream; True if it sent
        anything (a stream ended at once without data is retried with backoff)."""
        rv = self.resource_versions[res.kind]
        seconds = random.randint(self.watch_timeout, 2 * self.watch_timeout)
        params = {
            "watch": "1",
            "resourceVersion": rv,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(seconds),
            **self._selectors.get(res.kind, {}),
        }
        timeout = aiohttp.ClientTimeout(sock_connect=self.connect_timeout)
        async with await self._get(session, res, params, timeout) as resp:
            content = resp.content
            tail = b""
            received = False
            while True:
                try:
                    async with asyncio.timeout(self.stall_timeout):
                        chunk = await content.readany()
                except TimeoutError:
                    raise StreamStalled() from None
                if not chunk:
                    return received
                received = True
                lines = (tail + chunk).split(b"\n")
                tail = lines.pop()
                self._handle_lines(res, lines)

    def _handle_lines(self, res: Resource, lines: list[bytes]) -> None:
        """Decode and apply the complete watch lines of one read, as one batch."""
        kind = res.kind
        rv = self.resource_versions[kind]
        events: list[WatchEvent] = []
        try:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    ev = _event.decode(line)
                except msgspec.MsgspecError as e:
                    log.warning(
                        "skipping undecodable watch line",
                        resource=res.plural,
                        error=str(e),
                        line=line[:200],
                    )
                    continue
                if ev.type == "BOOKMARK":
                    rv = _head.decode(ev.object).metadata.resource_version or rv
                    continue
                if ev.type == "ERROR":
                    status = _parse_status(ev.object, 500)
                    if status.code == 410:
                        raise Gone(status.message)
                    raise APIError(status.code, status.message, status.reason)
                if ev.type not in _EVENT_TYPES:
                    log.warning("skipping unknown watch event", resource=res.plural, type=ev.type)
                    continue
                type_ = EventType(ev.type)
                try:
                    obj = decode(kind, ev.object)
                except InvalidObject as e:
                    head = _head.decode(ev.object) if _is_object(ev.object) else _Head()
                    rv = head.metadata.resource_version or rv
                    log.warning(
                        "skipping invalid object",
                        kind=kind,
                        object=e.name,
                        type=ev.type,
                        reason=e.reason,
                    )
                    if type_ is EventType.DELETED and head.metadata.name:
                        events.append(WatchEvent(type_, _stub(kind, head.metadata)))
                    continue
                events.append(WatchEvent(type_, obj))
                rv = obj.metadata.resource_version or rv
        finally:
            # Apply what decoded before any error and remember where to resume, even if a
            # subscriber raised: the state has the events, a retry must not replay them.
            try:
                if events:
                    self.state.apply(events)
            finally:
                self.resource_versions[kind] = rv


def decode_list(kind: Kind, body: bytes, into: list[KubeObject]) -> _ListMeta:
    """Decode one list page into `into`; invalid items are logged and skipped."""
    try:
        page = _typed_list[kind].decode(body)
    except msgspec.ValidationError:
        page = None
    if page is not None:
        for obj in page.items or ():
            try:
                validate(obj)
            except InvalidObject as e:
                log.warning("skipping invalid object", kind=kind, object=e.name, reason=e.reason)
                continue
            into.append(obj)
        return page.metadata  # type: ignore[no-any-return]
    # Some item does not even decode: go item by item to name it and keep the others.
    raw = _raw_list.decode(body)
    for item in raw.items or ():
        try:
            into.append(decode(kind, item))
        except InvalidObject as e:
            log.warning("skipping invalid object", kind=kind, object=e.name, reason=e.reason)
    return raw.metadata


def _is_object(raw: bytes) -> bool:
    try:
        _head.decode(raw)
        return True
    except msgspec.MsgspecError:
        return False


def _stub(kind: Kind, meta: ObjectMeta) -> KubeObject:
    """An object carrying only its key: enough to delete one whose last state was invalid."""
    meta = ObjectMeta(name=meta.name, namespace=meta.namespace)
    if kind == "Service":
        return Service(metadata=meta)
    if kind == "Node":
        return Node(metadata=meta)
    return EndpointSlice(metadata=meta, address_type="IPv4")


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__

"""A fake kube-apiserver for the faults a real one cannot produce on demand.

It speaks the real list/watch protocol over HTTPS for v1 Services and discovery.k8s.io/v1
EndpointSlices (cluster scope): paginated lists with `limit`/`continue` at one resourceVersion,
watches as a chunked stream of JSON lines (ADDED/MODIFIED/DELETED/BOOKMARK/ERROR), one global
resourceVersion counter, compaction (a watch or continue token older than the compacted
resourceVersion gets 410 Gone, as an HTTP 410 or as an ERROR event, as the real server does
depending on where the request is served), bearer-token and client-certificate authentication
(401 Status), and fault controls: drop every connection, stall the streams, forbid a resource
(403 Status worded like the RBAC authorizer's), inject an ERROR 410 mid-stream, store an object
the client will find invalid.

Controls are methods for in-process use and `POST /_control/...` for the subprocess form.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import copy
import json
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

RESOURCES = {
    "services": ("/api/v1/services", "", "Service", "v1"),
    "endpointslices": (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "discovery.k8s.io",
        "EndpointSlice",
        "discovery.k8s.io/v1",
    ),
}
PLURAL = {"Service": "services", "EndpointSlice": "endpointslices"}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class Event:
    rv: int
    plural: str
    type: str
    line: bytes  # the encoded watch line, newline included


@dataclass(eq=False)
class _Watcher:
    plural: str
    request: web.Request
    errors: list[dict[str, Any]] = field(default_factory=list)
    stalled: bool = False


class FakeAPIServer:
    def __init__(
        self,
        *,
        tokens: set[str] | None = None,
        bookmark_interval: float = 60.0,
        gone_as_http: bool = False,
    ) -> None:
        self.tokens = tokens if tokens is not None else {"test-token"}
        self.bookmark_interval = bookmark_interval
        self.gone_as_http = gone_as_http  # 410 on a too-old watch: HTTP status or ERROR event
        self.rv = 1
        self.compacted = 0  # resourceVersions below this are gone
        self.store: dict[str, dict[tuple[str, str], tuple[dict[str, Any], bytes]]] = {
            p: {} for p in RESOURCES
        }
        self.events: list[Event] = []
        self.forbidden: set[str] = set()
        self.fail_next: list[int] = []  # HTTP statuses to answer the next requests with
        # What clients asked for, for assertions: (verb, plural, query params).
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.sent_at: dict[int, float] = {}  # rv -> time.monotonic() the event was written
        self._sent_waiters: dict[int, asyncio.Future[float]] = {}
        self._watchers: set[_Watcher] = set()
        self._changed = asyncio.Condition()
        self._snapshots: dict[tuple[str, int], list[bytes]] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle --------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        for plural, (path, *_) in RESOURCES.items():
            app.router.add_get(path, self._make_handler(plural))
        app.router.add_post("/_control/{action}", self._control)
        return app

    async def start(
        self, ssl_context: ssl.SSLContext | None, host: str = "127.0.0.1", port: int = 0
    ) -> str:
        self._runner = web.AppRunner(self.app(), handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return f"{'https' if ssl_context else 'http'}://{host}:{self.port}"

    async def stop(self) -> None:
        self.drop_connections()
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    def server_ssl_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        if client_ca:
            ctx.load_verify_locations(client_ca)
            ctx.verify_mode = ssl.CERT_OPTIONAL  # like kube-apiserver: a cert or a token
        return ctx

    # --- mutations ----------------------------------------------------------------------------

    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def _record(self, plural: str, type_: str, obj: dict[str, Any]) -> int:
        rv = self._next_rv()
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(rv)
        kind, api_version = RESOURCES[plural][2], RESOURCES[plural][3]
        obj.setdefault("kind", kind)
        obj.setdefault("apiVersion", api_version)
        body = _dumps(obj)
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if type_ == "DELETED":
            self.store[plural].pop(key, None)
        else:
            self.store[plural][key] = (obj, body)
        line = b'{"type":"' + type_.encode() + b'","object":' + body + b"}\n"
        self.events.append(Event(rv, plural, type_, line))
        self._notify()
        return rv

    def _notify(self) -> None:
        async def wake() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(wake())

    def put(self, obj: dict[str, Any]) -> int:
        """Create or update an object (its kind picks the resource); returns its resourceVersion."""
        plural = PLURAL[obj["kind"]]
        key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        return self._record(plural, "MODIFIED" if key in self.store[plural] else "ADDED", obj)

    def delete(self, kind: str, namespace: str, name: str) -> int:
        plural = PLURAL[kind]
        obj, _ = self.store[plural][(namespace, name)]
        return self._record(plural, "DELETED", obj)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.store[PLURAL[kind]][(namespace, name)][0])

    def load(self, objects: list[dict[str, Any]]) -> None:
        """Bulk-create objects at one resourceVersion (no watch events: the starting state)."""
        rv = self._next_rv()
        for obj in objects:
            plural = PLURAL[obj["kind"]]
            obj.setdefault("apiVersion", RESOURCES[plural][3])
            obj["metadata"]["resourceVersion"] = str(rv)
            key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
            self.store[plural][key] = (obj, _dumps(obj))
        self.compacted = max(self.compacted, 0)

    # --- fault controls -----------------------------------------------------------------------

    def drop_connections(self) -> None:
        """Abort every open watch connection, as a restarting API server or a dead LB would."""
        for w in list(self._watchers):
            if w.request.transport is not None:
                w.request.transport.abort()
        self._notify_safe()

    def compact(self) -> None:
        """Forget history: any resourceVersion before now is 410 Gone."""
        self.compacted = self.rv + 1
        self._snapshots.clear()
        self._notify_safe()

    def send_gone(self) -> None:
        """Compact, and end every open watch with an ERROR event carrying a 410 Status."""
        self.compact()
        self.send_error(status(410, "Expired", "too old resource version"))

    def send_error(self, error: dict[str, Any]) -> None:
        """End every open watch with an ERROR event carrying `error` (a Status)."""
        for w in self._watchers:
            w.errors.append(error)
        self._notify_safe()

    def bookmark_now(self) -> None:
        self._bookmark_due = True
        self._notify_safe()

    @property
    def watches(self) -> int:
        """How many watch streams are open."""
        return sum(
            1
            for w in self._watchers
            if w.request.transport is not None and not w.request.transport.is_closing()
        )

    def stall(self, on: bool = True) -> None:
        """Stop (or resume) sending on the open watches, keeping their connections open;
        watches opened later are served normally."""
        for w in self._watchers:
            w.stalled = on
        self._notify_safe()

    def _notify_safe(self) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop (during teardown)
            self._notify()

    # --- HTTP handlers ------------------------------------------------------------------------

    def _make_handler(self, plural: str) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            query = dict(request.query)
            watch = query.get("watch") in ("1", "true")
            verb = "watch" if watch else "list"
            self.requests.append((verb, plural, query))
            if self.fail_next:
                code = self.fail_next.pop(0)
                return web.json_response(status(code, "InternalError", "injected"), status=code)
            if (denied := self._authenticate(request)) is not None:
                return denied
            if plural in self.forbidden:
                group = RESOURCES[plural][1]
                return web.json_response(
                    status(
                        403,
                        "Forbidden",
                        f"{plural}{'.' + group if group else ''} is forbidden: User "
                        f'"system:serviceaccount:kube-system:kubeshim" cannot {verb} resource '
                        f'"{plural}" in API group "{group}" at the cluster scope',
                    ),
                    status=403,
                )
            if watch:
                return await self._watch(request, plural, query)
            return self._list(plural, query)

        return handler

    def _authenticate(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and auth[7:] in self.tokens:
            return None
        transport = request.transport
        if transport is not None and transport.get_extra_info("peercert"):
            return None  # a client certificate the TLS layer verified against the client CA
        return web.json_response(status(401, "Unauthorized", "Unauthorized"), status=401)

    def _list(self, plural: str, query: dict[str, str]) -> web.Response:
        limit = int(query.get("limit", "0") or 0)
        if token := query.get("continue"):
            snap_rv, start = json.loads(base64.b64decode(token))
            items = self._snapshots.get((plural, snap_rv))
            if snap_rv < self.compacted or items is None:
                return web.json_response(
                    status(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list "
                        "result. You can start a new list without the continue parameter.",
                    ),
                    status=410,
                )
        else:
            snap_rv, start = self.rv, 0
            items = [body for _, (_, body) in sorted(self.store[plural].items())]
            if limit:
                self._snapshots[(plural, snap_rv)] = items
        end = start + limit if limit else len(items)
        meta: dict[str, Any] = {"resourceVersion": str(snap_rv)}
        if end < len(items):
            meta["continue"] = base64.b64encode(_dumps([snap_rv, end])).decode()
        _, _, kind, api_version = RESOURCES[plural]
        body = (
            b'{"kind":"'
            + kind.encode()
            + b'List","apiVersion":"'
            + api_version.encode()
            + b'","metadata":'
            + _dumps(meta)
            + b',"items":['
            + b",".join(items[start:end])
            + b"]}"
        )
        return web.Response(body=body, content_type="application/json")

    async def _watch(
        self, request: web.Request, plural: str, query: dict[str, str]
    ) -> web.StreamResponse:
        rv_text = query.get("resourceVersion", "")
        since = int(rv_text) if rv_text not in ("", "0") else None
        too_old = since is not None and since < self.compacted - 1
        gone = status(410, "Expired", f"too old resource version: {since} ({self.compacted - 1})")
        if too_old and self.gone_as_http:
            return web.json_response(gone, status=410)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if too_old:
            await resp.write(_dumps({"type": "ERROR", "object": gone}) + b"\n")
            return resp
        timeout = float(query.get("timeoutSeconds", "1800"))
        deadline = time.monotonic() + timeout
        bookmarks = query.get("allowWatchBookmarks") == "true"
        watcher = _Watcher(plural, request)
        self._watchers.add(watcher)
        try:
            if since is None:  # "any" resourceVersion: synthetic ADDED for the current state
                for _obj, body in sorted(self.store[plural].values(), key=lambda o: o[1]):
                    await resp.write(b'{"type":"ADDED","object":' + body + b"}\n")
                since = self.rv
            pos = bisect.bisect_right([e.rv for e in self.events], since)
            next_bookmark = time.monotonic() + self.bookmark_interval
            while True:
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                if not watcher.stalled:
                    if watcher.errors:
                        await resp.write(
                            _dumps({"type": "ERROR", "object": watcher.errors[0]}) + b"\n"
                        )
                        break
                    while pos < len(self.events):
                        ev = self.events[pos]
                        pos += 1
                        if ev.plural == plural:
                            self.sent_at[ev.rv] = time.monotonic()
                            await resp.write(ev.line)
                            if (fut := self._sent_waiters.pop(ev.rv, None)) and not fut.done():
                                fut.set_result(self.sent_at[ev.rv])
                    now = time.monotonic()
                    if bookmarks and (
                        now >= next_bookmark or getattr(self, "_bookmark_due", False)
                    ):
                        self._bookmark_due = False
                        await resp.write(self._bookmark(plural))
                        next_bookmark = now + self.bookmark_interval
                    if now >= deadline:
                        break
                wait = max(0.01, min(next_bookmark, deadline) - time.monotonic())
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), min(wait, 0.5))
        except (ConnectionError, RuntimeError):
            pass  # the client went away
        finally:
            self._watchers.discard(watcher)
        return resp

    def _bookmark(self, plural: str) -> bytes:
        kind, api_version = RESOURCES[plural][2], RESOURCES[plural][3]
        obj = {
            "kind": kind,
            "apiVersion": api_version,
            "metadata": {"resourceVersion": str(self.rv)},
        }
        return _dumps({"type": "BOOKMARK", "object": obj}) + b"\n"

    async def wait_sent(self, rv: int) -> float:
        """Wait until the event with `rv` was written to a watcher; its monotonic send time."""
        if rv in self.sent_at:
            return self.sent_at[rv]
        fut = self._sent_waiters.setdefault(rv, asyncio.get_running_loop().create_future())
        return await fut

    # --- control endpoint (subprocess form) ------------------------------------------------------

    async def _control(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        q = request.query
        result: dict[str, Any] = {}
        if action == "put":
            rv = self.put(await request.json())
            result = {"resourceVersion": rv}
            if q.get("wait") == "sent":
                result["sent"] = await asyncio.wait_for(self.wait_sent(rv), 10)
        elif action == "delete":
            result = {"resourceVersion": self.delete(q["kind"], q["namespace"], q["name"])}
        elif action == "drop":
            self.drop_connections()
        elif action == "compact":
            self.compact()
        elif action == "gone":
            self.send_gone()
        elif action == "stall":
            self.stall(q.get("on", "true") == "true")
        elif action == "forbid":
            self.forbidden.add(q["resource"])
        elif action == "permit":
            self.forbidden.discard(q["resource"])
        else:
            raise web.HTTPNotFound()
        return web.json_response(result)

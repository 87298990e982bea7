"""kmock's Kubernetes emulator, completed with what a real apiserver adds, served on a thread.

kmock 0.8 stores objects but does not stamp resourceVersion/uid/generation, loses watch
events between its snapshot and its bus subscription, has no list kind, no Table responses
and no CRD registration. `StampingEmulator` adds those (Kopf needs resourceVersion for its
JSON patches; kubectl needs list kinds and Tables), bumps `generation` on spec changes, and
keeps kmock's request log short (its per-request cost grows with the log: ~2 ms per patch
when kept short, ~80 ms after 300 requests otherwise). Uses kmock internals: pin kmock==0.8;
`test_kmock_k8s.py` checks the helper itself.

Remaining gaps (tests that touch them say so): no controllers (Deployments never get pods or
status), no garbage collection by owner references, no label-selector filtering, strategic
merge = merge patch, no PUT, no schema validation, no OpenAPI, status subresource not isolated.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import re
import threading
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import jsonpatch
import kmock

_TASKS: set[asyncio.Task[None]] = set()
REQUEST_LOG = 5
CRDS = kmock.resource("apiextensions.k8s.io/v1/customresourcedefinitions")
_FILTER = re.compile(
    r"^(?P<list>[^\[]+)\[\?\(@\.(?P<key>\w+)==\"(?P<value>[^\"]*)\"\)\](?P<rest>.*)$"
)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _walk(obj: Any, path: str) -> Any:
    for key in [k for k in path.strip(".").split(".") if k]:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def jsonpath(obj: Any, path: str) -> Any:
    """The JSONPaths printer columns use: `.a.b` and `.a[?(@.k=="v")].b`."""
    match = _FILTER.match(path)
    if match is None:
        return _walk(obj, path)
    items = _walk(obj, match["list"])
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and str(item.get(match["key"])) == match["value"]:
            return _walk(item, match["rest"])
    return None


def _age(ts: str) -> str:
    then = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    s = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


@attrs.define(kw_only=True)
class StampingEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    _rv: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    printer_columns: dict[Any, list[dict[str, Any]]] = attrs.field(factory=dict)

    def register_crd(self, crd: dict[str, Any]) -> None:
        s = crd["spec"]
        for v in s["versions"]:
            res = kmock.resource(s["group"], v["name"], s["names"]["plural"])
            self.resources[res] = kmock.ResourceInfo(
                kind=s["names"]["kind"],
                singular=s["names"].get("singular", s["names"]["kind"].lower()),
                namespaced=s.get("scope", "Namespaced") == "Namespaced",
                shortnames=s["names"].get("shortNames", []),
                categories=s["names"].get("categories", []),
                verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
                subresources={"status"} if "status" in v.get("subresources", {}) else set(),
            )
            self.printer_columns[res] = v.get("additionalPrinterColumns", [])

    def _next_rv(self) -> int:
        return next(self._rv)

    async def _handle(self, request: Any) -> Any:
        # kmock records every request for assertions and its per-request work grows with the
        # record (a patch took ~30x longer after 300 requests): keep only the newest ones.
        if len(self._requests) > 2 * REQUEST_LOG:
            del self._requests[:-REQUEST_LOG]
            for payload in self._payloads:  # each reaction keeps the requests it served, too
                served = getattr(payload, "_requests", None)
                if isinstance(served, list):
                    del served[:-REQUEST_LOG]
        data, res = request.data, request.resource
        if res is not None and request.action == kmock.action.CREATE and isinstance(data, dict):
            data.setdefault(
                "apiVersion", f"{res.group}/{res.version}" if res.group else res.version
            )
            if res in self.resources and self.resources[res].kind:
                data.setdefault("kind", self.resources[res].kind)
            md = data.setdefault("metadata", {})
            if not md.get("name") and md.get("generateName"):
                md["name"] = md["generateName"] + uuid.uuid4().hex[:5]
            if request.namespace:
                md.setdefault("namespace", request.namespace)
            md.setdefault("uid", str(uuid.uuid4()))
            md.setdefault("creationTimestamp", _now())
            md.setdefault("generation", 1)
            md["resourceVersion"] = str(self._next_rv())
            if res == CRDS:
                self.register_crd(data)
                task = asyncio.create_task(self._establish(md["name"]))
                _TASKS.add(task)
                task.add_done_callback(_TASKS.discard)
        elif res is not None and request.action == kmock.action.UPDATE:
            rv = str(self._next_rv())
            if isinstance(data, dict):
                md = data.setdefault("metadata", {})
                md["resourceVersion"] = rv
                if "spec" in data and not request.subresource:
                    md["generation"] = self._generation(request) + 1
            elif isinstance(data, list):
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
        try:
            response = await super()._handle(request)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from None
        if res is not None and request.action == kmock.action.UPDATE and request.name:
            await self._forget_history((res, request.namespace, request.name))
        return response

    async def _forget_history(self, key: Any) -> None:
        """Keep only the newest version: kmock keeps every version, and its per-request cost
        grows with them (a status patch per control tick made requests ~25x slower after
        300 patches). The operator never reads old versions."""
        async with self._lock:
            if key in self._objects and not self._objects[key].deleted:
                obj = self._objects[key]
                obj.history = [obj.last.raw]

    def _generation(self, request: Any) -> int:
        try:
            obj = self._objects[request.resource, request.namespace, request.name]
            return int(obj.get("metadata", {}).get("generation") or 1)
        except (KeyError, TypeError, ValueError):
            return 1

    async def _establish(self, name: str) -> None:
        await asyncio.sleep(0.1)
        async with self._lock:
            obj = self._objects[CRDS, None, name]
            if not obj.deleted:
                obj.patch(
                    {
                        "metadata": {"resourceVersion": str(self._next_rv())},
                        "status": {"conditions": [{"type": "Established", "status": "True"}]},
                    }
                )
                await self._buses[CRDS].put({"type": "MODIFIED", "object": obj.raw})

    async def _serve_watch(self, request: Any) -> Any:
        yield b""
        since = int(request.params.get("resourceVersion") or 0)
        bus = self._buses[request.resource]
        async with self._lock:
            mark = await bus.mark()
            objs = self._KubernetesEmulator__get_objs(request, strict=False)
            events = [
                {"type": "ADDED", "object": o.raw}
                for o in objs
                if not o.deleted
                if int(o.raw.get("metadata", {}).get("resourceVersion") or 0) > since
            ]
        try:
            for event in events:
                yield event
            async for event in bus.stream(since=mark):
                md = event.get("object", {}).get("metadata", {})
                if self._KubernetesEmulator__check(
                    request, request.resource, md.get("namespace"), md.get("name"), strict=False
                ):
                    yield event
        finally:
            await bus.unmark(mark)

    async def _render_error(self, exc: Exception) -> Any:
        if isinstance(exc, kmock.KubernetesError):
            reasons = {404: "NotFound", 409: "AlreadyExists", 422: "Invalid"}
            exc = attrs.evolve(exc, reason=reasons.get(exc.status, exc.reason), details={})
        return await super()._render_error(exc)

    async def _serve_list(self, request: Any) -> Any:
        result, res = await super()._serve_list(request), request.resource
        if "as=Table" in request.headers.get("Accept", ""):
            declared = self.printer_columns.get(res, [])
            cols = [{"name": "Name", "type": "string", "jsonPath": ".metadata.name"}, *declared]
            if not any(c["name"] == "Age" for c in declared):
                cols.append(
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
                )

            def cell(o: dict[str, Any], c: dict[str, Any]) -> Any:
                v = jsonpath(o, c["jsonPath"])
                return _age(v) if c["type"] == "date" and v else "" if v is None else v

            return {
                "kind": "Table",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": {"resourceVersion": "0"},
                "columnDefinitions": [
                    {
                        "name": c["name"],
                        "type": c["type"],
                        "format": "",
                        "description": "",
                        "priority": c.get("priority", 0),
                    }
                    for c in cols
                ],
                "rows": [
                    {
                        "cells": [cell(o, c) for c in cols],
                        "object": {
                            "kind": "PartialObjectMetadata",
                            "apiVersion": "meta.k8s.io/v1",
                            "metadata": o.get("metadata", {}),
                        },
                    }
                    for o in result["items"]
                ],
            }
        kind = self.resources[res].kind if res in self.resources else None
        rv = max(
            (int(i.get("metadata", {}).get("resourceVersion") or 0) for i in result["items"]),
            default=0,
        )
        return {
            **result,
            "kind": f"{kind or 'Unknown'}List",
            "apiVersion": f"{res.group}/{res.version}" if res.group else res.version,
            "metadata": {"resourceVersion": str(rv)},
        }


@attrs.define(frozen=True)
class Fault:
    """An apiserver fault: requests whose method matches (`*`: any) and whose path matches the
    regular expression `path` wait `delay_s`, then get `status` (0: served as usual)."""

    method: str
    path: str
    status: int = 0
    delay_s: float = 0.0


#: Requests with this header are never faulted: the test's own reads see the stored state
#: while the operator's requests fail.
OBSERVER_HEADER = "X-Kmock-Observer"


@attrs.define(kw_only=True)
class FaultyEmulator(StampingEmulator):
    """The emulator with injectable faults (409/500 bursts, outages, a hung apiserver). The
    test sets `faults` from its own thread; `hits` counts the requests each fault answered."""

    faults: tuple[Fault, ...] = ()
    hits: dict[Fault, int] = attrs.field(factory=dict)

    async def _handle(self, request: Any) -> Any:
        method = str(getattr(request.method, "value", request.method)).upper()
        path = request.url.path
        observer = any(k.lower() == OBSERVER_HEADER.lower() for k in request.headers)
        for fault in () if observer else self.faults:
            if fault.method in ("*", method) and re.search(fault.path, path):
                self.hits[fault] = self.hits.get(fault, 0) + 1
                if fault.delay_s:
                    await asyncio.sleep(fault.delay_s)
                if fault.status:
                    raise kmock.KubernetesError(
                        status=fault.status, reason="Injected", message=f"injected {fault.status}"
                    )
                break
        return await super()._handle(request)


class ThreadedKMock:
    """`with ThreadedKMock() as srv:` serves the emulator at `srv.url` from its own thread."""

    def __init__(self, cls: type[StampingEmulator] = StampingEmulator) -> None:
        self.cls, self._ready = cls, threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.url = ""

    async def _main(self) -> None:
        self._stop, self._loop = asyncio.Event(), asyncio.get_running_loop()
        async with self.cls() as emu, kmock.Server(emu) as srv:
            emu.resources.load_bundled()
            self.emulator, self.url = emu, str(srv.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(emulator, *args) in the server's thread."""

        async def run() -> Any:
            return fn(self.emulator, *args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def __enter__(self) -> ThreadedKMock:
        self._thread.start()
        if not self._ready.wait(20):
            raise RuntimeError("kmock did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

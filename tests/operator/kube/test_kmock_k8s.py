"""The emulator helper itself: what it adds to kmock 0.8 must keep working (kmock is v0.x)."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
from kmock_k8s import ThreadedKMock, jsonpath

CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.dev"},
    "spec": {
        "group": "example.dev",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wd"]},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                    {
                        "name": "Ready",
                        "type": "string",
                        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                    },
                ],
            }
        ],
    },
}
URL = "/apis/example.dev/v1/namespaces/ns1/widgets"
MERGE = {"Content-Type": "application/merge-patch+json"}


def test_jsonpath_reads_printer_column_filters() -> None:
    obj = {
        "status": {
            "conditions": [{"type": "A", "status": "x"}, {"type": "Ready", "status": "True"}]
        }
    }
    assert jsonpath(obj, '.status.conditions[?(@.type=="Ready")].status') == "True"
    assert jsonpath(obj, '.status.conditions[?(@.type=="Gone")].status') is None
    assert jsonpath(obj, ".status.missing.deeper") is None


def test_emulator_stamps_objects_bumps_generation_on_spec_only_and_serves_tables() -> None:
    with ThreadedKMock() as srv, httpx.Client(base_url=srv.url) as http:
        srv.call(lambda emu: emu.register_crd(CRD))
        created = http.post(URL, json={"metadata": {"name": "w1"}, "spec": {"size": 1}}).json()
        md = created["metadata"]
        assert created["kind"] == "Widget" and created["apiVersion"] == "example.dev/v1"
        assert md["uid"] and md["generation"] == 1 and int(md["resourceVersion"]) > 0
        assert http.post(URL, json={"metadata": {"name": "w1"}}).status_code == 409

        spec = http.patch(f"{URL}/w1", content=json.dumps({"spec": {"size": 2}}), headers=MERGE)
        status = http.patch(
            f"{URL}/w1/status",
            content=json.dumps({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
            headers=MERGE,
        )
        assert spec.json()["metadata"]["generation"] == 2
        assert status.json()["metadata"]["generation"] == 2
        assert int(status.json()["metadata"]["resourceVersion"]) > int(md["resourceVersion"])

        listing = http.get(URL).json()
        assert listing["kind"] == "WidgetList"
        table = http.get(URL, headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})
        cols = [c["name"] for c in table.json()["columnDefinitions"]]
        assert cols == ["Name", "Size", "Ready", "Age"]
        assert table.json()["rows"][0]["cells"][:3] == ["w1", 2, "True"]

        event = http.post(
            "/api/v1/namespaces/ns1/events", json={"metadata": {"generateName": "w1."}}
        ).json()
        assert event["metadata"]["name"].startswith("w1.")
        missing = http.get(f"{URL}/nope").json()
        assert missing["reason"] == "NotFound"


def test_watch_replays_only_objects_newer_than_the_resource_version() -> None:
    with ThreadedKMock() as srv, httpx.Client(base_url=srv.url, timeout=5) as http:
        srv.call(lambda emu: emu.register_crd(CRD))
        old = http.post(URL, json={"metadata": {"name": "old"}}).json()
        seen: list[str] = []
        done = threading.Event()

        def watch() -> None:
            rv = old["metadata"]["resourceVersion"]
            with http.stream("GET", URL, params={"watch": "true", "resourceVersion": rv}) as r:
                for line in r.iter_lines():
                    if line.strip():
                        seen.append(json.loads(line)["object"]["metadata"]["name"])
                        if "new" in seen:
                            break
            done.set()

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        http.post(URL, json={"metadata": {"name": "new"}})
        assert done.wait(10)
    assert seen == ["new"]

"""Templates: CRUD over REST and the rendering rules of PROTOCOL §5."""

from __future__ import annotations

import re
from typing import Any

import pytest
from conftest import EmbeddedServer, ServerFactory
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import ApiError
from common.templating import render

ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
TEMPLATES = "/api/v1/templates"

SHIPPED = {
    "id": "order-shipped",
    "name": "Order shipped",
    "event_type": "order.shipped",
    "payload_template": {
        "title": "Order {{order_id}} shipped",
        "amount": "{{amount}}",
        "customer": "{{ order.customer.id }}",
        "tags": ["{{tag}}", "fixed"],
    },
    "priority": "High",
    "ttl": 600,
    "description": "sent when an order leaves the warehouse",
}


# -- rendering (pure) ------------------------------------------------------------


def test_whole_string_placeholder_keeps_the_variable_json_type() -> None:
    variables = {"n": 99.5, "flag": True, "none": None, "list": [1, 2], "obj": {"a": 1}, "i": 3}
    template = {k: f"{{{{{k}}}}}" for k in variables}
    assert render(template, variables) == variables


def test_placeholder_inside_text_is_written_as_text() -> None:
    rendered = render(
        "n={{n}} b={{b}} z={{z}} l={{l}} s={{s}}",
        {"n": 1.5, "b": False, "z": None, "l": [1, "x"], "s": "str"},
    )
    assert rendered == 'n=1.5 b=false z=null l=[1,"x"] s=str'


def test_nested_paths_and_spacing_are_supported() -> None:
    variables = {"order": {"customer": {"id": "C-7"}, "items": ["first", "second"]}}
    assert render("{{order.customer.id}}", variables) == "C-7"
    assert render("{{  order.customer.id  }}", variables) == "C-7"
    assert render("x {{order.items.1}}", variables) == "x second"


def test_rendering_is_one_pass() -> None:
    variables = {"a": "{{b}}", "b": "boom"}
    assert render({"x": "{{a}}", "y": "say {{a}}"}, variables) == {"x": "{{b}}", "y": "say {{b}}"}


def test_keys_and_non_string_values_are_rendered_or_kept() -> None:
    assert render({"{{k}}": 1, "n": 2, "t": True, "z": None}, {"k": "key"}) == {
        "key": 1, "n": 2, "t": True, "z": None,
    }


@pytest.mark.parametrize("template", ["{{missing}}", "a {{missing}} b", {"x": ["{{missing}}"]},
                                      "{{order.nope}}"])
def test_missing_variable_raises_template_variable_missing(template: Any) -> None:
    with pytest.raises(ApiError) as info:
        render(template, {"order": {"id": 1}})
    assert info.value.status == 422
    assert info.value.code == "TEMPLATE_VARIABLE_MISSING"
    assert info.value.details is not None
    assert info.value.details["variable"] in ("missing", "order.nope")


@settings(max_examples=60, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
))
def test_any_value_substituted_whole_comes_back_unchanged(value: Any) -> None:
    assert render({"v": "{{v}}"}, {"v": value}) == {"v": value}


# -- CRUD ------------------------------------------------------------------------


async def test_template_crud_round_trip(server: EmbeddedServer) -> None:
    created = await server.post(TEMPLATES, SHIPPED)
    assert created.status_code == 201
    body = created.json()
    assert body["id"] == "order-shipped"
    assert body["name"] == "Order shipped"
    assert body["event_type"] == "order.shipped"
    assert body["payload_template"] == SHIPPED["payload_template"]
    assert body["default_priority"] == "High"
    assert body["default_ttl"] == 600
    assert body["description"] == SHIPPED["description"]
    assert ISO_UTC.match(body["created_at"]) and ISO_UTC.match(body["updated_at"])

    assert (await server.get(f"{TEMPLATES}/order-shipped")).json() == body
    listed = (await server.get(TEMPLATES)).json()
    assert [t["id"] for t in listed["templates"]] == ["order-shipped"]

    assert server.client is not None
    replaced = await server.client.put(f"{TEMPLATES}/order-shipped", json={
        "event_type": "order.sent", "payload_template": {"t": "{{x}}"},
        "default_priority": "Low",
    })
    assert replaced.status_code == 200
    new = replaced.json()
    assert new["event_type"] == "order.sent"
    assert new["default_priority"] == "Low"
    assert new["default_ttl"] is None
    assert new["created_at"] == body["created_at"]
    assert (await server.get(f"{TEMPLATES}/order-shipped")).json()["event_type"] == "order.sent"

    deleted = await server.client.delete(f"{TEMPLATES}/order-shipped")
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert (await server.get(f"{TEMPLATES}/order-shipped")).status_code == 404
    assert (await server.get(TEMPLATES)).json()["templates"] == []


async def test_creating_an_existing_template_is_409(server: EmbeddedServer) -> None:
    assert (await server.post(TEMPLATES, SHIPPED)).status_code == 201
    again = await server.post(TEMPLATES, {**SHIPPED, "event_type": "other"})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "TEMPLATE_EXISTS"
    assert (await server.get(f"{TEMPLATES}/order-shipped")).json()["event_type"] == "order.shipped"


async def test_unknown_template_is_404_everywhere(server: EmbeddedServer) -> None:
    assert server.client is not None
    responses = [
        await server.get(f"{TEMPLATES}/nope"),
        await server.client.put(f"{TEMPLATES}/nope", json={"event_type": "e"}),
        await server.client.delete(f"{TEMPLATES}/nope"),
        await server.post("/api/v1/notifications/send",
                          {"target_user_id": "u1", "template_id": "nope"}),
    ]
    for response in responses:
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "TEMPLATE_NOT_FOUND"


@pytest.mark.parametrize(("body", "field"), [
    ({"event_type": "e"}, "id"),
    ({"id": "bad id", "event_type": "e"}, "id"),
    ({"id": "t1"}, "event_type"),
    ({"id": "t1", "event_type": "e", "priority": "Meh"}, "default_priority"),
    ({"id": "t1", "event_type": "e", "ttl": 0}, "default_ttl"),
])
@pytest.mark.asyncio(loop_scope="module")
async def test_invalid_template_is_422(
    shared_server: EmbeddedServer, body: dict, field: str,
) -> None:
    response = await shared_server.post(TEMPLATES, body)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"
    assert response.json()["error"]["details"]["field"] == field


async def test_send_with_template_renders_payload_and_uses_its_defaults(
    server: EmbeddedServer,
) -> None:
    assert (await server.post(TEMPLATES, SHIPPED)).status_code == 201
    async with server.ws("u1") as ws:
        response = await server.post("/api/v1/notifications/send", {
            "target_user_id": "u1", "template_id": "order-shipped",
            "variables": {"order_id": "ORD-1", "amount": 99.5, "tag": ["a", "b"],
                          "order": {"customer": {"id": 42}}},
        })
        assert response.status_code == 200, response.text
        frame = await ws.expect("notification")
        assert frame["event_type"] == "order.shipped"
        assert frame["payload"] == {
            "title": "Order ORD-1 shipped", "amount": 99.5, "customer": 42,
            "tags": [["a", "b"], "fixed"],
        }
        assert frame["metadata"]["priority"] == "High"
        assert frame["metadata"]["ttl"] == 600
        override = await server.post("/api/v1/notifications/send", {
            "target_user_id": "u1", "template_id": "order-shipped", "priority": "Low",
            "ttl": 60, "variables": {"order_id": "{{amount}}", "amount": 1, "tag": "t",
                                     "order": {"customer": {"id": "c"}}},
        })
        assert override.status_code == 200
        frame = await ws.expect("notification")
        assert frame["metadata"]["priority"] == "Low"
        assert frame["metadata"]["ttl"] == 60
        assert frame["payload"]["title"] == "Order {{amount}} shipped"


async def test_send_with_a_missing_variable_is_422_and_sends_nothing(
    server: EmbeddedServer,
) -> None:
    assert (await server.post(TEMPLATES, SHIPPED)).status_code == 201
    async with server.ws("u1") as ws:
        response = await server.post("/api/v1/notifications/send", {
            "target_user_id": "u1", "template_id": "order-shipped",
            "variables": {"order_id": "ORD-1", "amount": 1, "tag": "t"},
        })
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "TEMPLATE_VARIABLE_MISSING"
        assert "order.customer.id" in error["message"]
        await ws.assert_silent(0.2)


async def test_templates_are_per_tenant(server_factory: ServerFactory) -> None:
    server = await server_factory(tenant_enabled=True)
    acme = {"X-Tenant-ID": "acme"}
    assert (await server.post(TEMPLATES, SHIPPED, headers=acme)).status_code == 201
    assert (await server.get(f"{TEMPLATES}/order-shipped")).status_code == 404
    assert (await server.get(f"{TEMPLATES}/order-shipped", headers=acme)).status_code == 200
    assert (await server.post(TEMPLATES, SHIPPED)).status_code == 201


async def test_batch_items_may_use_templates(server: EmbeddedServer) -> None:
    await server.post(TEMPLATES, {"id": "hello", "event_type": "greet",
                                  "payload_template": {"msg": "hi {{name}}"}})
    async with server.ws("u1") as ws:
        body = (await server.post("/api/v1/notifications/batch", {"notifications": [
            {"target": {"type": "user", "value": "u1"}, "template_id": "hello",
             "variables": {"name": "Ann"}},
            {"target": {"type": "user", "value": "u1"}, "template_id": "hello"},
        ]})).json()
        assert body["results"][0]["success"] is True
        assert body["results"][1]["error"]["code"] == "TEMPLATE_VARIABLE_MISSING"
        assert (await ws.expect("notification"))["payload"] == {"msg": "hi Ann"}
        await ws.assert_silent(0.2)

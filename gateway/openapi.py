"""``/openapi.json``: an OpenAPI 3.1 document built from the request models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from common import __version__
from common.api_models import (
    AckRequest,
    BatchItem,
    BatchRequest,
    BroadcastRequest,
    ChannelRequest,
    ChannelsRequest,
    SendRequest,
    SendToUsersRequest,
    TemplateBody,
)

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "object"},
            },
        }
    },
}

SEND_RESULT = {
    "type": "object",
    "required": ["success", "notification_id", "delivered_to", "failed", "timestamp"],
    "properties": {
        "success": {"type": "boolean"},
        "notification_id": {"type": "string"},
        "delivered_to": {"type": "integer"},
        "failed": {"type": "integer"},
        "timestamp": {"type": "string", "format": "date-time"},
    },
    "additionalProperties": True,
}

SENDS: list[tuple[str, type[BaseModel], str]] = [
    ("/api/v1/notifications/send", SendRequest, "Send to every device of one user"),
    ("/api/v1/notifications/send-to-users", SendToUsersRequest, "Send to up to 10,000 users"),
    ("/api/v1/notifications/broadcast", BroadcastRequest, "Send to every connection of the tenant"),
    ("/api/v1/notifications/channel", ChannelRequest, "Send to one channel's subscribers"),
    ("/api/v1/notifications/channels", ChannelsRequest, "Send to several channels, one copy each"),
    ("/api/v1/notifications/batch", BatchRequest, "Up to 100 sends in one request"),
]

READS: list[tuple[str, str, str]] = [
    ("/api/v1/channels", "get", "Channels with subscribers, cluster-wide"),
    ("/api/v1/channels/{name}", "get", "One channel"),
    ("/api/v1/users/{user_id}/subscriptions", "get", "A connected user's channels"),
    ("/api/v1/notifications/{notification_id}", "get", "Delivery receipt"),
    ("/api/v1/stats", "get", "Connection, notification and ACK statistics"),
    ("/api/v1/stats/acks", "get", "ACK statistics"),
    ("/api/v1/tenants", "get", "Per-tenant usage"),
    ("/api/v1/tenants/{tenant_id}", "get", "One tenant's usage"),
    ("/api/v1/cluster/status", "get", "Gateways, routers and partitions"),
    ("/api/v1/cluster/users/{user_id}", "get", "Where a user's sessions live"),
    ("/api/v1/templates", "get", "List templates"),
    ("/api/v1/templates/{template_id}", "get", "Get a template"),
    ("/api/v1/templates/{template_id}", "delete", "Delete a template"),
]

_ERRORS = {
    str(code): {
        "description": text,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    for code, text in [
        (400, "Malformed JSON"),
        (401, "Missing or wrong API key"),
        (403, "Forbidden for this tenant"),
        (404, "Not found"),
        (409, "Conflict"),
        (413, "Body too large"),
        (415, "Not JSON"),
        (422, "Validation error"),
        (429, "Rate limited"),
        (503, "A required backend is down"),
    ]
}


def _params(path: str) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": "X-Tenant-ID", "in": "header", "required": False,
         "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.\\-]{1,64}$"}},
    ]
    for part in path.split("/"):
        if part.startswith("{") and part.endswith("}"):
            params.append({"name": part[1:-1], "in": "path", "required": True,
                           "schema": {"type": "string", "minLength": 1, "maxLength": 256}})
    return params


def build_openapi() -> dict[str, Any]:
    models = [SendRequest, SendToUsersRequest, BroadcastRequest, ChannelRequest, ChannelsRequest,
              BatchRequest, BatchItem, TemplateBody, AckRequest]
    _, defs = models_json_schema(
        [(m, "validation") for m in models],  # type: ignore[misc]
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    schemas["Error"] = ERROR_SCHEMA
    schemas["SendResult"] = SEND_RESULT
    paths: dict[str, Any] = {}
    for path, model, summary in SENDS:
        paths[path] = {
            "post": {
                "summary": summary,
                "security": [{"ApiKey": []}],
                "parameters": [
                    *_params(path),
                    {"name": "Idempotency-Key", "in": "header", "required": False,
                     "schema": {"type": "string", "minLength": 1, "maxLength": 255}},
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {
                        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
                },
                "responses": {
                    "200": {"description": "Accepted", "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/SendResult"}}}},
                    **_ERRORS,
                },
            }
        }
    for path, method, summary in READS:
        paths.setdefault(path, {})[method] = {
            "summary": summary,
            "security": [{"ApiKey": []}],
            "parameters": _params(path),
            "responses": {
                "204" if method == "delete" else "200": {"description": "OK"},
                **_ERRORS,
            },
        }
    template_body = {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/TemplateBody"}}}}
    paths["/api/v1/templates"]["post"] = {
        "summary": "Create a template", "security": [{"ApiKey": []}],
        "parameters": _params("/api/v1/templates"), "requestBody": template_body,
        "responses": {"201": {"description": "Created"}, **_ERRORS},
    }
    paths["/api/v1/templates/{template_id}"]["put"] = {
        "summary": "Replace a template", "security": [{"ApiKey": []}],
        "parameters": _params("/api/v1/templates/{template_id}"), "requestBody": template_body,
        "responses": {"200": {"description": "Replaced"}, **_ERRORS},
    }
    for path, summary in [("/health", "Liveness and backend health"),
                          ("/ready", "Readiness: 503 while starting or draining"),
                          ("/metrics", "Prometheus metrics")]:
        responses = {"200": {"description": "OK"}, "503": {"description": "Not ready"}}
        paths[path] = {"get": {"summary": summary, "responses": responses}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Ara Notification Service", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
    }

"""Read-side REST endpoints: channels, users, cluster view, stats, receipts, templates."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from common.api_models import TemplateBody
from common.backends.base import Template
from common.errors import ApiError
from common.protocol import CHANNEL_RE, TEMPLATE_ID_RE, utc_iso, valid_tenant, valid_user_id
from gateway.http import SEND_BODY_LIMIT, JSONResponse, principal, read_json, tenant_of, validate
from gateway.node import GatewayNode


def _node(request: Request) -> GatewayNode:
    node: GatewayNode = request.app.state.node
    return node


def _tenant(request: Request) -> str:
    return tenant_of(request, principal(request))


async def list_channels(request: Request) -> Response:
    tenant = _tenant(request)
    counts = await _node(request).backends.sessions.channel_counts(tenant)
    channels = [
        {"name": name, "subscriber_count": count}
        for (_, name), count in sorted(counts.items())
        if count > 0
    ]
    return JSONResponse({"channels": channels, "total_channels": len(channels)})


async def get_channel(request: Request) -> Response:
    tenant = _tenant(request)
    name = request.path_params["name"]
    if CHANNEL_RE.fullmatch(name) is None:
        raise ApiError(404, "CHANNEL_NOT_FOUND", "no such channel")
    placement = await _node(request).backends.sessions.channel_nodes(tenant, [name])
    nodes = placement.get(name, {})
    total = sum(nodes.values())
    if total == 0:
        raise ApiError(404, "CHANNEL_NOT_FOUND", f"channel '{name}' has no subscribers")
    return JSONResponse({"name": name, "subscriber_count": total, "nodes": sorted(nodes)})


async def user_subscriptions(request: Request) -> Response:
    tenant = _tenant(request)
    user_id = request.path_params["user_id"]
    sessions = [] if not valid_user_id(user_id) else (
        await _node(request).backends.sessions.sessions_of(tenant, [user_id])
    ).get(user_id, [])
    if not sessions:
        raise ApiError(404, "USER_NOT_CONNECTED", "user has no live connection")
    channels = sorted({ch for s in sessions for ch in s.channels})
    return JSONResponse(
        {"user_id": user_id, "connection_count": len(sessions), "subscriptions": channels}
    )


async def cluster_user(request: Request) -> Response:
    tenant = _tenant(request)
    user_id = request.path_params["user_id"]
    sessions = [] if not valid_user_id(user_id) else (
        await _node(request).backends.sessions.sessions_of(tenant, [user_id])
    ).get(user_id, [])
    return JSONResponse(
        {"user_id": user_id, "found": bool(sessions), "sessions": [s.public() for s in sessions]}
    )


async def cluster_status(request: Request) -> Response:
    if principal(request).bound_tenant is not None:
        raise ApiError(403, "FORBIDDEN", "cluster status needs the operator API key")
    node = _node(request)
    status = await node.cluster_status()
    return JSONResponse(status)


async def stats(request: Request) -> Response:
    tenant = _tenant(request)
    node = _node(request)
    return JSONResponse(await node.stats(tenant))


async def ack_stats(request: Request) -> Response:
    tenant = _tenant(request)
    node = _node(request)
    result = await node.backends.receipts.stats(
        tenant, time.time(), node.settings.ack_timeout_seconds
    )
    return JSONResponse(asdict(result))


async def get_receipt(request: Request) -> Response:
    tenant = _tenant(request)
    node = _node(request)
    notification_id = request.path_params["notification_id"]
    receipt = None
    if 1 <= len(notification_id) <= 64:
        receipt = await node.backends.receipts.get(tenant, notification_id)
    if receipt is None:
        raise ApiError(404, "NOTIFICATION_NOT_FOUND", "no such notification")
    acked_by = [
        {"user_id": user, "connection_id": conn, "acked_at": utc_iso(at)}
        for user, conn, at in receipt.acked_by
    ]
    acked_users = {a["user_id"] for a in acked_by}
    pending: Any
    if receipt.target.user_ids:
        pending = [u for u in dict.fromkeys(receipt.target.user_ids) if u not in acked_users]
    else:
        pending = []
    return JSONResponse(
        {
            "notification_id": receipt.notification_id,
            "event_type": receipt.event_type,
            "target": receipt.target.to_dict(),
            "created_at": utc_iso(receipt.created_at),
            "expires_at": utc_iso(receipt.expires_at),
            "delivered_to": receipt.delivered_to,
            "acked_by": acked_by,
            "pending": pending,
        }
    )


async def list_tenants(request: Request) -> Response:
    who = principal(request)
    node = _node(request)
    names = [who.bound_tenant] if who.bound_tenant else await node.known_tenants()
    tenants = [await node.tenant_usage(name) for name in names]
    return JSONResponse({"tenants": tenants, "total": len(tenants)})


async def get_tenant(request: Request) -> Response:
    who = principal(request)
    tenant_id = request.path_params["tenant_id"]
    if who.bound_tenant is not None and tenant_id != who.bound_tenant:
        raise ApiError(403, "FORBIDDEN", "this API key may only read its own tenant")
    if not valid_tenant(tenant_id):
        raise ApiError(404, "TENANT_NOT_FOUND", "no such tenant")
    return JSONResponse(await _node(request).tenant_usage(tenant_id))


# -- templates -------------------------------------------------------------


def _template_id(request: Request) -> str:
    template_id: str = request.path_params["template_id"]
    if TEMPLATE_ID_RE.fullmatch(template_id) is None:
        raise ApiError(404, "TEMPLATE_NOT_FOUND", "no such template")
    return template_id


async def create_template(request: Request) -> Response:
    tenant = _tenant(request)
    body = validate(TemplateBody, await read_json(request, SEND_BODY_LIMIT))
    if body.id is None:
        raise ApiError(422, "VALIDATION_ERROR", "id is required", {"field": "id"})
    now = time.time()
    template = Template(
        id=body.id, tenant_id=tenant, name=body.name, event_type=body.event_type,
        payload_template=body.payload_template, default_priority=body.default_priority,
        default_ttl=body.default_ttl, description=body.description,
        created_at=now, updated_at=now,
    )
    if not await _node(request).backends.templates.create(template):
        raise ApiError(409, "TEMPLATE_EXISTS", f"template '{body.id}' already exists")
    return JSONResponse(template.public(), status_code=201)


async def list_templates(request: Request) -> Response:
    tenant = _tenant(request)
    templates = await _node(request).backends.templates.list(tenant)
    return JSONResponse({"templates": [t.public() for t in templates], "total": len(templates)})


async def get_template(request: Request) -> Response:
    tenant = _tenant(request)
    template = await _node(request).backends.templates.get(tenant, _template_id(request))
    if template is None:
        raise ApiError(404, "TEMPLATE_NOT_FOUND", "no such template")
    return JSONResponse(template.public())


async def replace_template(request: Request) -> Response:
    tenant = _tenant(request)
    template_id = _template_id(request)
    body = validate(TemplateBody, await read_json(request, SEND_BODY_LIMIT))
    if body.id is not None and body.id != template_id:
        raise ApiError(422, "VALIDATION_ERROR", "id in body differs from the path",
                       {"field": "id"})
    store = _node(request).backends.templates
    current = await store.get(tenant, template_id)
    if current is None:
        raise ApiError(404, "TEMPLATE_NOT_FOUND", "no such template")
    template = Template(
        id=template_id, tenant_id=tenant, name=body.name, event_type=body.event_type,
        payload_template=body.payload_template, default_priority=body.default_priority,
        default_ttl=body.default_ttl, description=body.description,
        created_at=current.created_at, updated_at=time.time(),
    )
    if not await store.replace(template):
        raise ApiError(404, "TEMPLATE_NOT_FOUND", "no such template")
    return JSONResponse(template.public())


async def delete_template(request: Request) -> Response:
    tenant = _tenant(request)
    if not await _node(request).backends.templates.delete(tenant, _template_id(request)):
        raise ApiError(404, "TEMPLATE_NOT_FOUND", "no such template")
    return Response(status_code=204)

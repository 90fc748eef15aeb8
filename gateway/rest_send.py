"""REST send endpoints (PROTOCOL §4): single, many users, broadcast, channels, batch."""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from common import jsoncodec
from common.api_models import (
    BatchItem,
    BatchRequest,
    BroadcastRequest,
    ChannelRequest,
    ChannelsRequest,
    Content,
    SendRequest,
    SendToUsersRequest,
    target_of,
)
from common.backends.base import RouteReport
from common.errors import ApiError
from common.protocol import Target, utc_iso
from common.sending import Sender
from gateway.http import (
    BATCH_BODY_LIMIT,
    SEND_BODY_LIMIT,
    JSONResponse,
    principal,
    read_json,
    tenant_of,
    validate,
    validation_failure,
)


def _base(report: RouteReport, notification_id: str) -> dict[str, Any]:
    return {
        "success": report.success,
        "notification_id": notification_id,
        "delivered_to": report.delivered_to,
        "failed": report.failed,
        "timestamp": utc_iso(time.time()),
    }


def _users_results(report: RouteReport) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for user_id, outcome in report.users.items():
        if outcome.connections:
            results[user_id] = {"delivered": True, "connections": outcome.connections}
        else:
            results[user_id] = {"delivered": False, "queued": outcome.queued}
    return results


def shape_response(target: Target, report: RouteReport, notification_id: str) -> dict[str, Any]:
    body = _base(report, notification_id)
    if target.kind == "user":
        body["queued"] = report.queued
    elif target.kind == "users":
        body["results"] = _users_results(report)
    elif target.kind == "channel":
        body["channel"] = target.channels[0]
    elif target.kind == "channels":
        body["channels"] = {ch: {"delivered_to": n} for ch, n in report.channels.items()}
        body["total_delivered"] = report.delivered_to
    return body


async def _send(request: Request, model_type: type[Content]) -> Response:
    who = principal(request)
    tenant = tenant_of(request, who)
    data = await read_json(request, SEND_BODY_LIMIT)
    model = validate(model_type, data)

    async def produce() -> tuple[int, dict[str, Any]]:
        sender: Sender = request.app.state.sender
        target = target_of(model)
        notification = await sender.build(model, tenant, "http-api")
        report = await sender.send(notification, target)
        return 200, shape_response(target, report, notification.id)

    status, body = await request.app.state.idempotency.run(
        request, tenant, who, data, produce
    )
    return JSONResponse(body, status_code=status)


async def send_user(request: Request) -> Response:
    return await _send(request, SendRequest)


async def send_users(request: Request) -> Response:
    return await _send(request, SendToUsersRequest)


async def send_broadcast(request: Request) -> Response:
    return await _send(request, BroadcastRequest)


async def send_channel(request: Request) -> Response:
    return await _send(request, ChannelRequest)


async def send_channels(request: Request) -> Response:
    return await _send(request, ChannelsRequest)


async def send_batch(request: Request) -> Response:
    who = principal(request)
    tenant = tenant_of(request, who)
    data = await read_json(request, BATCH_BODY_LIMIT)
    batch = validate(BatchRequest, data)

    async def produce() -> tuple[int, dict[str, Any]]:
        return 200, await run_batch(request.app.state.sender, batch, tenant)

    status, body = await request.app.state.idempotency.run(request, tenant, who, data, produce)
    return JSONResponse(body, status_code=status)


async def run_batch(sender: Sender, batch: BatchRequest, tenant: str) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    seen: set[bytes] = set()
    stop = False
    succeeded = failed = skipped = total_delivered = 0
    for index, raw in enumerate(batch.notifications):
        entry: dict[str, Any] = {"index": index, "success": False, "notification_id": None,
                                 "delivered_to": 0}
        if stop:
            entry["skipped"] = True
            skipped += 1
            results.append(entry)
            continue
        if batch.options.deduplicate:
            key = jsoncodec.dumps(_canonical(raw))
            if key in seen:
                entry["skipped"] = True
                entry["success"] = True
                skipped += 1
                results.append(entry)
                continue
            seen.add(key)
        try:
            try:
                item = BatchItem.model_validate(raw)
            except ValidationError as exc:
                raise validation_failure(exc) from None
            target = target_of(item)
            notification = await sender.build(item, tenant, "batch")
            report = await sender.send(notification, target)
            entry.update(
                success=report.success,
                notification_id=notification.id,
                delivered_to=report.delivered_to,
            )
            if not report.success:
                entry["error"] = {"code": "NOT_DELIVERED", "message": "no live connection and"
                                  " not queued"}
        except ApiError as err:
            entry["error"] = {"code": err.code, "message": err.message}
        if entry["success"]:
            succeeded += 1
            total_delivered += entry["delivered_to"]
        else:
            failed += 1
            if batch.options.stop_on_error:
                stop = True
        results.append(entry)
    batch_id = str(uuid.uuid4())
    return {
        "success": failed == 0,
        "notification_id": batch_id,
        "delivered_to": total_delivered,
        "failed": failed,
        "batch_id": batch_id,
        "results": results,
        "summary": {
            "total": len(results),
            "succeeded": succeeded,
            "failed": failed,
            "skipped": skipped,
            "total_delivered": total_delivered,
        },
        "timestamp": utc_iso(time.time()),
    }


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value

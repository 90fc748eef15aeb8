"""Turning a validated send request into a stamped, routed notification.

REST sends, batch items and Pub/Sub triggers all come through here, so
templates, ttl defaults and receipts behave the same whatever the entry.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from common.api_models import Content
from common.backends.base import Dispatcher, ReceiptStore, RouteReport, TemplateStore
from common.errors import ApiError
from common.metrics import Metrics
from common.protocol import Notification, Target
from common.settings import Settings
from common.templating import render

log = logging.getLogger("ara.sending")


@dataclass(slots=True)
class SendTotals:
    """Per-tenant send counters of this process (``/api/v1/stats``)."""

    sent: int = 0
    delivered: int = 0
    failed: int = 0
    queued: int = 0


class Sender:
    """Builds notifications from content (direct or template) and dispatches them."""

    def __init__(
        self,
        settings: Settings,
        dispatcher: Dispatcher,
        templates: TemplateStore,
        receipts: ReceiptStore,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.templates = templates
        self.receipts = receipts
        self.metrics = metrics
        self.totals: defaultdict[str, SendTotals] = defaultdict(SendTotals)

    async def build(self, content: Content, tenant_id: str, source: str) -> Notification:
        event_type = content.event_type
        payload: Any = content.payload if content.payload is not None else {}
        priority = content.priority
        ttl = content.ttl
        if content.template_id is not None:
            template = await self.templates.get(tenant_id, content.template_id)
            if template is None:
                raise ApiError(
                    404,
                    "TEMPLATE_NOT_FOUND",
                    f"template '{content.template_id}' does not exist",
                    {"field": "template_id"},
                )
            event_type = template.event_type
            payload = render(template.payload_template, content.variables or {})
            priority = priority or template.default_priority
            ttl = ttl if ttl is not None else template.default_ttl
        assert event_type is not None
        return Notification.create(
            tenant_id,
            event_type,
            payload,
            priority=priority or "Normal",
            ttl=ttl,
            correlation_id=content.correlation_id,
            source=source,
            default_ttl=self.settings.queue_message_ttl_seconds,
        )

    async def send(self, notification: Notification, target: Target) -> RouteReport:
        report = await self.dispatcher.dispatch(notification, target)
        self.metrics.notifications.labels(target.kind, notification.source.split(":")[0]).inc()
        queued = sum(1 for u in report.users.values() if u.queued)
        if queued:
            self.metrics.queued.inc(queued)
        totals = self.totals[notification.tenant_id]
        totals.sent += 1
        totals.delivered += report.delivered_to
        totals.failed += report.failed + (0 if report.success else 1)
        totals.queued += queued
        try:
            await self.receipts.record(notification, target, report.delivered_to)
        except Exception:
            log.warning("receipt for %s not recorded", notification.id, exc_info=True)
        return report

"""Turning a validated send request into a stamped, routed notification.

REST sends, batch items and Pub/Sub triggers all come through here, so
templates, ttl defaults and receipts behave the same whatever the entry.
"""

from __future__ import annotations

import logging
from typing import Any

from common.api_models import Content
from common.backends.base import Dispatcher, ReceiptStore, RouteReport, TemplateStore
from common.errors import ApiError
from common.logs import current_notification
from common.metrics import Metrics
from common.protocol import Notification, Target
from common.settings import Settings
from common.stats import StatsStore
from common.telemetry import carrier, span, tracing_enabled
from common.templating import render

log = logging.getLogger("ara.sending")


class Sender:
    """Builds notifications from content (direct or template) and dispatches them."""

    def __init__(
        self,
        settings: Settings,
        dispatcher: Dispatcher,
        templates: TemplateStore,
        receipts: ReceiptStore,
        metrics: Metrics,
        stats: StatsStore,
    ) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.templates = templates
        self.receipts = receipts
        self.metrics = metrics
        self.stats = stats

    async def build(self, content: Content, tenant_id: str, source: str) -> Notification:
        event_type = content.event_type
        payload: Any = content.payload if content.payload is not None else {}
        priority: str | None = content.priority
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
        if tracing_enabled():
            with span("ara.dispatch", attributes={
                "ara.notification_id": notification.id,
                "ara.target": target.kind,
                "ara.tenant": notification.tenant_id,
            }):
                notification.trace = carrier()
                report = await self.dispatcher.dispatch(notification, target)
        else:
            report = await self.dispatcher.dispatch(notification, target)
        token = current_notification.set(notification.id)
        try:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("notification accepted", extra={
                    "event_type": notification.event_type, "target": target.kind,
                    "delivered_to": report.delivered_to, "source": notification.source})
            self._count(notification, target, report)
            if not report.receipt_by_router:
                try:
                    await self.receipts.record(notification, target, report.delivered_to)
                except Exception:
                    log.warning("receipt not recorded", exc_info=True)
        finally:
            current_notification.reset(token)
        return report

    def _count(self, notification: Notification, target: Target, report: RouteReport) -> None:
        self.metrics.child(self.metrics.notifications, target.kind,
                           notification.source.split(":")[0]).inc()
        queued = sum(1 for u in report.users.values() if u.queued)
        if queued:
            self.metrics.queued.inc(queued)
        failed = report.failed + (0 if report.success else 1)
        self.stats.add(notification.tenant_id, 1, report.delivered_to, failed, queued)

"""Wiring of the embedded single node: local sessions, in-process router, SQLite."""

from __future__ import annotations

from common.backends.sqlite import SQLiteDatabase, SQLiteMailbox, SQLiteReceipts, SQLiteTemplates
from common.metrics import Metrics
from common.settings import Settings
from gateway.connections import ConnectionManager
from gateway.local import LocalDelivery, LocalSessionStore
from gateway.node import Backends
from router.routing import Router


def embedded_backends(settings: Settings, manager: ConnectionManager, metrics: Metrics) -> Backends:
    database = SQLiteDatabase(settings.sqlite_path)
    mailbox = SQLiteMailbox(database, settings.queue_max_size_per_user)
    sessions = LocalSessionStore(manager, settings.node_id)
    router = Router(settings, sessions, mailbox, LocalDelivery(manager))
    return Backends(
        sessions=sessions,
        mailbox=mailbox,
        receipts=SQLiteReceipts(database),
        templates=SQLiteTemplates(database),
        dispatcher=router,
        starters=[database.open],
        stoppers=[database.close],
        janitor=True,
    )

"""Baseline for REST: a bare Starlette app under the same uvicorn settings as the gateway.

One ``POST`` route that reads the JSON body, checks an API key header and
answers a small JSON document, and nothing else: what the framework costs
per request before the service does any work.
"""

from __future__ import annotations

import argparse
import time
import uuid

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

API_KEY = "bench-api-key-0123456789abcdef"


async def send(request: Request) -> Response:
    if request.headers.get("x-api-key") != API_KEY:
        return Response(b'{"error":"unauthorized"}', status_code=401,
                        media_type="application/json")
    body = orjson.loads(await request.body())
    return Response(orjson.dumps({
        "success": True, "notification_id": str(uuid.uuid4()), "delivered_to": 0,
        "failed": 0, "timestamp": time.time(), "queued": bool(body.get("target_user_id")),
    }), media_type="application/json")


app = Starlette(routes=[Route("/api/v1/notifications/send", send, methods=["POST"])])

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="auto", http="auto",
                log_config=None, access_log=False)

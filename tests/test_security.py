"""Attacks on the security rules of PROTOCOL §1, §2, §7 and §9, tried for real.

Every attack runs against a real server on loopback: the embedded node for the
token, input and masking rules, and additionally a multi-process cluster for
tenant isolation, where tenants meet in shared Redis keys and Postgres tables.
``tests/test_auth.py`` holds the basic token checks; this file is the attacker's
matrix: every forged token on every surface that takes one, tenant escape
through every REST route and socket message, hostile JSON, slow clients, channel
names built to collide, API-key brute force and production error masking.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import contextlib
import hashlib
import hmac
import inspect
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets
from conftest import (
    TEST_API_KEY,
    TEST_JWT_SECRET,
    EmbeddedServer,
    ServerFactory,
    eventually,
    rsa_pair,
    sse_connect,
    ws_connect,
    ws_rejection,
)

import common.auth
from common.auth import ApiKeyChecker
from common.settings import load_settings

ISSUER = "https://issuer.test"
AUDIENCE = "ara-clients"
ACME_KEY = "acme-key-0123456789abcdef"
GLOBEX_KEY = "globex-key-0123456789abcdef"
TENANT_KEYS = f"acme:{ACME_KEY},globex:{GLOBEX_KEY}"
# Look-alikes, spelled as escapes so the source shows what they are.
FULLWIDTH_ACME = "\uff41\uff43\uff4d\uff45"
FULLWIDTH_ALICE = "\uff41lice"
CYRILLIC_ORDERS = "\u043erders"
FULLWIDTH_ORDERS = "\uff4frders"


# -- token forging -------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], claims: dict[str, Any], key: bytes | None,
              digest: Any = hashlib.sha256) -> str:
    """A JWT built by hand, so headers and signatures can be anything at all."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    if key is None:
        return signing_input + "."
    signature = hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


def good_claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"sub": "u1", "iat": now, "exp": now + 600, "iss": ISSUER, "aud": AUDIENCE}
    claims.update(extra)
    return {k: v for k, v in claims.items() if v is not None}


def hs(claims: dict[str, Any], secret: str = TEST_JWT_SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=alg)


OTHER_PRIVATE, _ = rsa_pair()


def _tampered() -> str:
    header, _, signature = hs(good_claims()).split(".")
    forged = b64url(json.dumps(good_claims(sub="admin", roles=["admin"])).encode())
    return f"{header}.{forged}.{signature}"


HS256_ATTACKS: dict[str, Callable[[], str]] = {
    "alg none": lambda: raw_token({"alg": "none", "typ": "JWT"}, good_claims(), None),
    "alg None": lambda: raw_token({"alg": "None", "typ": "JWT"}, good_claims(), None),
    "alg NONE": lambda: raw_token({"alg": "NONE", "typ": "JWT"}, good_claims(), None),
    "alg nOnE with a signature": lambda: raw_token(
        {"alg": "nOnE"}, good_claims(), TEST_JWT_SECRET.encode()),
    "signature stripped": lambda: hs(good_claims()).rsplit(".", 1)[0] + ".",
    "payload tampered after signing": _tampered,
    "wrong secret": lambda: hs(good_claims(), "x" * 40),
    "empty secret and kid traversal": lambda: raw_token(
        {"alg": "HS256", "kid": "../../../../dev/null"}, good_claims(), b""),
    "HS512 with the right secret": lambda: raw_token(
        {"alg": "HS512"}, good_claims(), TEST_JWT_SECRET.encode(), hashlib.sha512),
    "HS384 with the right secret": lambda: raw_token(
        {"alg": "HS384"}, good_claims(), TEST_JWT_SECRET.encode(), hashlib.sha384),
    "RS256 with an unknown key": lambda: jwt.encode(good_claims(), OTHER_PRIVATE, "RS256"),
    "expired beyond leeway": lambda: hs(good_claims(exp=int(time.time()) - 60)),
    "not yet valid": lambda: hs(good_claims(nbf=int(time.time()) + 60)),
    "no exp": lambda: hs(good_claims(exp=None)),
    "exp not a number": lambda: raw_token(
        {"alg": "HS256"}, good_claims(exp="tomorrow"), TEST_JWT_SECRET.encode()),
    "wrong issuer": lambda: hs(good_claims(iss="https://evil.test")),
    "no issuer": lambda: hs(good_claims(iss=None)),
    "wrong audience": lambda: hs(good_claims(aud="someone-else")),
    "no audience": lambda: hs(good_claims(aud=None)),
    "audience list without ours": lambda: hs(good_claims(aud=["a", "b"])),
    "tenant with ':' separator": lambda: hs(good_claims(tenant_id="acme:u2")),
    "tenant with hash-tag brace": lambda: hs(good_claims(tenant_id="acme}")),
    "tenant with unit separator": lambda: hs(good_claims(tenant_id="acme\x1fu2")),
    "tenant fullwidth homoglyph": lambda: hs(good_claims(tenant_id=FULLWIDTH_ACME)),
    "tenant not a string": lambda: hs(good_claims(tenant_id=["acme"])),
    "sub with control character": lambda: hs(good_claims(sub="u1\x1fu2")),
    "sub with newline": lambda: hs(good_claims(sub="u1\nu2")),
    "sub too long": lambda: hs(good_claims(sub="u" * 257)),
    "sub not a string": lambda: hs(good_claims(sub=42)),
    "four segments": lambda: hs(good_claims()) + ".AAAA",
    "not base64": lambda: "%%%.%%%.%%%",
}


@dataclass
class Surface:
    """One place that takes a client token, and how to knock on it."""

    name: str
    knock: Callable[[EmbeddedServer, str], Awaitable[tuple[int, Any]]]


async def _ws_query(server: EmbeddedServer, token: str) -> tuple[int, Any]:
    refused = await ws_rejection(server.ws_url(token))
    return refused.status_code, refused.json()


async def _ws_header(server: EmbeddedServer, token: str) -> tuple[int, Any]:
    refused = await ws_rejection(server.ws_url(), {"Authorization": f"Bearer {token}"})
    return refused.status_code, refused.json()


async def _sse(server: EmbeddedServer, token: str, header: bool) -> tuple[int, Any]:
    url = server.sse_url() if header else server.sse_url(token)
    headers = {"Authorization": f"Bearer {token}"} if header else None
    async with httpx.AsyncClient(timeout=5) as http:
        async with http.stream("GET", url, headers=headers) as response:
            if response.status_code == 200:
                return 200, None
            await response.aread()
            return response.status_code, response.json()


async def _sse_ack(server: EmbeddedServer, token: str) -> tuple[int, Any]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=5) as http:
        response = await http.post("/sse/ack", json={"notification_id": str(uuid.uuid4())},
                                   headers={"Authorization": f"Bearer {token}"})
        return response.status_code, response.json()


SURFACES = [
    Surface("ws ?token=", _ws_query),
    Surface("ws Authorization", _ws_header),
    Surface("sse ?token=", lambda s, t: _sse(s, t, header=False)),
    Surface("sse Authorization", lambda s, t: _sse(s, t, header=True)),
    Surface("POST /sse/ack", _sse_ack),
]


@pytest.fixture
async def strict_server(server_factory: ServerFactory) -> EmbeddedServer:
    """HS256 with issuer, audience and a short leeway configured."""
    return await server_factory(jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwt_leeway_seconds=5,
                                tenant_enabled=True)


@pytest.mark.parametrize("attack", sorted(HS256_ATTACKS))
async def test_forged_and_invalid_tokens_are_refused_on_every_surface(
    strict_server: EmbeddedServer, attack: str,
) -> None:
    token = HS256_ATTACKS[attack]()
    for surface in SURFACES:
        status, body = await asyncio.wait_for(surface.knock(strict_server, token), 10)
        assert status == 401, f"{surface.name} let '{attack}' in ({status})"
        assert body["error"]["code"] == "UNAUTHORIZED"
        assert TEST_JWT_SECRET not in json.dumps(body)
    assert len(strict_server.node.manager) == 0


async def test_valid_tokens_pass_every_surface_and_the_leeway_only_helps_sse_ack(
    strict_server: EmbeddedServer,
) -> None:
    token = hs(good_claims())
    async with ws_connect(strict_server.ws_url(token)) as ws:
        assert ws.hello["user_id"] == "u1"
    async with ws_connect(strict_server.ws_url(),
                          headers={"Authorization": f"Bearer {token}"}) as ws:
        assert ws.hello["user_id"] == "u1"
    async with sse_connect(strict_server.sse_url(token)) as sse:
        assert sse.hello is not None
    status, body = await _sse_ack(strict_server, token)
    assert status == 422 and body["error"]["code"] == "INVALID_ACK"
    # Expired 1 s ago, inside the 5 s leeway (minted right before each use): an ACK is still
    # authenticated, but no socket opens on it, since it could not outlive exp (PROTOCOL §9).
    def late() -> str:
        return hs(good_claims(exp=int(time.time()) - 1))

    status, body = await _sse_ack(strict_server, late())
    assert status == 422 and body["error"]["code"] == "INVALID_ACK"
    for surface in SURFACES[:4]:
        status, body = await surface.knock(strict_server, late())
        assert status == 401 and body["error"]["code"] == "UNAUTHORIZED", surface.name


async def test_rs256_deployment_refuses_algorithm_confusion_on_every_surface(
    server_factory: ServerFactory,
) -> None:
    private, public = rsa_pair()
    server = await server_factory(jwt_algorithm="RS256", jwt_public_key=public)
    claims = {"sub": "u1", "exp": int(time.time()) + 600}
    pem = public.encode()
    attacks = {
        "HS256 keyed with the public PEM": raw_token({"alg": "HS256", "typ": "JWT"}, claims, pem),
        "HS256 keyed with the public PEM, stripped": raw_token(
            {"alg": "HS256"}, claims, pem.strip()),
        "HS512 keyed with the public PEM": raw_token({"alg": "HS512"}, claims, pem,
                                                     hashlib.sha512),
        "alg none": raw_token({"alg": "none"}, claims, None),
        "HS256 with the development secret": hs(claims, load_settings().effective_jwt_secret),
        "RS256 with another key": jwt.encode(claims, OTHER_PRIVATE, "RS256"),
        "PS256 with the right key": jwt.encode(claims, private, "PS256"),
        "RS512 with the right key": jwt.encode(claims, private, "RS512"),
        "RS256 expired": jwt.encode({**claims, "exp": int(time.time()) - 120}, private, "RS256"),
    }
    for label, token in attacks.items():
        for surface in SURFACES:
            status, _ = await surface.knock(server, token)
            assert status == 401, f"{surface.name} let '{label}' in"
    async with ws_connect(server.ws_url(jwt.encode(claims, private, "RS256"))) as ws:
        assert ws.hello["user_id"] == "u1"


# -- tenant escape ---------------------------------------------------------------------


@dataclass
class Peer:
    """A socket that reads in the background, so nothing it gets goes unseen."""

    ws: Any
    tenant: str
    user: str
    hello: dict[str, Any]
    frames: list[dict[str, Any]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, url: str, tenant: str, user: str) -> AsyncIterator[Peer]:
        async with websockets.connect(url, open_timeout=5, max_size=None) as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert hello["type"] == "connected", hello
            peer = cls(ws, tenant, user, hello)
            peer.task = asyncio.get_running_loop().create_task(peer._read())
            try:
                yield peer
            finally:
                peer.task.cancel()
                with contextlib.suppress(BaseException):
                    await peer.task

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.ws:
                self.frames.append(json.loads(raw))

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def wait_for(self, check: Callable[[dict[str, Any]], bool],
                       within: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + within
        seen = 0
        while time.monotonic() < deadline:
            for frame in self.frames[seen:]:
                seen += 1
                if check(frame):
                    return frame
            await asyncio.sleep(0.02)
        raise AssertionError(f"{self.tenant}/{self.user}: no matching frame in {self.frames}")

    def notifications(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == "notification"]

    def got(self, marker: str) -> bool:
        return any(marked(f, marker) for f in self.frames)


def marked(frame: dict[str, Any], marker: str) -> bool:
    payload = frame.get("payload") if frame.get("type") == "notification" else None
    return isinstance(payload, dict) and payload.get("marker") == marker


@dataclass
class Deployment:
    """What the tenant-escape test needs from an embedded node or a cluster."""

    rest: list[str]
    ws: list[str]
    token: Callable[[str, str], str]
    global_key: str
    settle: float
    internal_prefixes: list[str]
    redis_url: str | None = None

    def http(self, key: str, i: int = 0, **headers: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.rest[i % len(self.rest)], timeout=10,
                                 headers={"X-API-Key": key, **headers})

    def ws_url(self, tenant: str, user: str, i: int = 0) -> str:
        return f"{self.ws[i % len(self.ws)]}?token={self.token(user, tenant)}"

    def sse_url(self, tenant: str, user: str, channels: str, i: int = 0) -> str:
        base = self.rest[i % len(self.rest)]
        return f"{base}/sse?token={self.token(user, tenant)}&channels={channels}"


@contextlib.asynccontextmanager
async def embedded_deployment(server_factory: ServerFactory, tmp_path: Path
                              ) -> AsyncIterator[Deployment]:
    server = await server_factory(tenant_enabled=True, tenant_api_keys=TENANT_KEYS)
    yield Deployment(
        rest=[server.base_url], ws=[server.ws_url()],
        token=lambda user, tenant: server.token(user, tenant=tenant),
        global_key=TEST_API_KEY, settle=0.3, internal_prefixes=[],
    )


@contextlib.asynccontextmanager
async def cluster_deployment(server_factory: ServerFactory, tmp_path: Path
                             ) -> AsyncIterator[Deployment]:
    from cluster_harness import API_KEY, running_cluster

    env = {"TENANT_ENABLED": "true", "TENANT_API_KEYS": TENANT_KEYS,
           # Rate limits on (but out of reach), so their Redis buckets exist to be inspected.
           "RATELIMIT_ENABLED": "true", "RATELIMIT_HTTP_REQUESTS_PER_SECOND": "100000",
           "RATELIMIT_HTTP_BURST_SIZE": "100000", "RATELIMIT_WS_CONNECTIONS_PER_MINUTE": "100000"}
    async with running_cluster(tmp_path, gateways=2, routers=1, env=env) as cluster:
        gateways = cluster.gateways()
        yield Deployment(
            rest=[g.base for g in gateways], ws=[g.ws for g in gateways],
            token=lambda user, tenant: cluster.token(user, tenant),
            global_key=API_KEY, settle=1.5, internal_prefixes=[cluster.prefix + ":", "ara:"],
            redis_url=cluster.redis_url,
        )


LEAK = re.compile(r"(acme|globex)[:\x1f|{}]|\\u001f")


class Recorder:
    """Every REST answer the attacker gets, to search for leaks afterwards."""

    def __init__(self) -> None:
        self.bodies: list[str] = []

    async def __call__(self, request: Awaitable[httpx.Response]) -> httpx.Response:
        response = await request
        self.bodies.append(response.text)
        assert response.status_code < 500, response.text
        return response


@pytest.mark.parametrize("mode", ["embedded", pytest.param("cluster", marks=pytest.mark.cluster)])
@pytest.mark.timeout(120)
async def test_no_tenant_can_reach_another_through_any_api(
    server_factory: ServerFactory, tmp_path: Path, mode: str,
) -> None:
    make = embedded_deployment if mode == "embedded" else cluster_deployment
    async with make(server_factory, tmp_path) as d:
        await _tenant_escape(d)


async def _tenant_escape(d: Deployment) -> None:
    rec = Recorder()
    acme = d.http(ACME_KEY, 0)
    globex = d.http(GLOBEX_KEY, 1)
    operator_as_acme = d.http(d.global_key, 1, **{"X-Tenant-ID": "acme"})
    async with (
        acme, globex, operator_as_acme,
        Peer.open(d.ws_url("acme", "u1", 0), "acme", "u1") as a1,
        Peer.open(d.ws_url("globex", "u1", 1), "globex", "u1") as g1,
        sse_connect(d.sse_url("globex", "u1", "orders,globex-only", 0)) as g1_sse,
    ):
        for peer, channels in ((a1, ["orders"]), (g1, ["orders", "globex-only"])):
            await peer.send({"type": "Subscribe", "payload": {"channels": channels}})
            await peer.wait_for(lambda f: f["type"] == "subscribed")
        await asyncio.sleep(d.settle / 3)

        # Cluster status is for the operator key only.
        assert (await rec(acme.get("/api/v1/cluster/status"))).status_code == 403
        assert (await rec(operator_as_acme.get("/api/v1/cluster/status"))).status_code == 200

        # A bound key cannot pick another tenant; the operator key can pick one on purpose.
        for method, path in [("GET", "/api/v1/channels"), ("GET", "/api/v1/stats"),
                             ("GET", "/api/v1/templates"), ("POST", "/api/v1/notifications/send")]:
            response = await rec(acme.request(method, path, headers={"X-Tenant-ID": "globex"},
                                              json={"target_user_id": "u1", "event_type": "x"}))
            assert response.status_code == 403, (method, path)
            assert response.json()["error"]["code"] == "FORBIDDEN"

        # Every send kind, through a bound key and through the operator key with X-Tenant-ID.
        sends = [
            ("/api/v1/notifications/send", {"target_user_id": "u1"}),
            ("/api/v1/notifications/send-to-users", {"target_user_ids": ["u1", "u9"]}),
            ("/api/v1/notifications/broadcast", {}),
            ("/api/v1/notifications/channel", {"channel": "orders"}),
            ("/api/v1/notifications/channels", {"channels": ["orders", "globex-only"]}),
        ]
        markers = []
        for client in (acme, operator_as_acme):
            for path, target in sends:
                marker = f"acme-{uuid.uuid4().hex[:8]}"
                body = {**target, "event_type": "acme.event",
                        "payload": {"tenant": "acme", "marker": marker}}
                response = await rec(client.post(path, json=body))
                assert response.status_code == 200, response.text
                markers.append(marker)
        batch_marker = f"acme-batch-{uuid.uuid4().hex[:6]}"
        batch = {"notifications": [
            {"target": {"type": kind, "value": value}, "event_type": "acme.batch",
             "payload": {"tenant": "acme", "marker": f"{batch_marker}-{i}"}}
            for i, (kind, value) in enumerate([("user", "u1"), ("users", ["u1"]),
                                               ("broadcast", None), ("channel", "orders"),
                                               ("channel", "globex-only"),
                                               ("channels", ["orders"])])]}
        response = await rec(acme.post("/api/v1/notifications/batch", json=batch))
        assert response.status_code == 200 and response.json()["summary"]["failed"] == 0
        # acme's u1 gets every one of them except the batch item for 'globex-only': acme
        # has no subscriber there, and globex's subscribers are not acme's.
        markers.extend(f"{batch_marker}-{i}" for i in (0, 1, 2, 3, 5))
        for marker in markers:
            await a1.wait_for(lambda f, m=marker: marked(f, m))

        # globex sends too, so there is something to steal.
        globex_ids = {}
        for path, target in sends:
            body = {**target, "event_type": "globex.event",
                    "payload": {"tenant": "globex", "marker": f"globex-{path}"}}
            response = await rec(globex.post(path, json=body))
            assert response.status_code == 200
            globex_ids[path] = response.json()["notification_id"]
        secret_id = globex_ids["/api/v1/notifications/send"]
        await g1.wait_for(lambda f: f.get("id") == secret_id)
        await asyncio.sleep(d.settle)

        # Receipts: another tenant's notification id does not exist for acme.
        for client in (acme, operator_as_acme):
            response = await rec(client.get(f"/api/v1/notifications/{secret_id}"))
            assert response.status_code == 404
        assert (await rec(globex.get(f"/api/v1/notifications/{secret_id}"))).status_code == 200

        # ACK: acme's socket and acme's SSE token cannot acknowledge globex's notification.
        await a1.send({"type": "Ack", "payload": {"notification_id": secret_id}})
        error = await a1.wait_for(lambda f: f["type"] == "error")
        assert error["code"] == "INVALID_ACK"
        async with httpx.AsyncClient(base_url=d.rest[0], timeout=10) as http:
            response = await rec(http.post(
                "/sse/ack", json={"notification_id": secret_id},
                headers={"Authorization": f"Bearer {d.token('u1', 'acme')}"}))
            assert response.status_code == 422
            assert response.json()["error"]["code"] == "INVALID_ACK"
        receipt = (await rec(globex.get(f"/api/v1/notifications/{secret_id}"))).json()
        assert receipt["acked_by"] == [] and receipt["pending"] == ["u1"]

        # Queues: globex's offline u2 has a queued event; acme's u2 must not replay it.
        queued = (await rec(globex.post("/api/v1/notifications/send", json={
            "target_user_id": "u2", "event_type": "globex.queued",
            "payload": {"tenant": "globex", "marker": "globex-queued"}}))).json()
        assert queued["queued"] is True
        await asyncio.sleep(d.settle)
        async with Peer.open(d.ws_url("acme", "u2", 1), "acme", "u2") as a2:
            await asyncio.sleep(d.settle)
            assert a2.notifications() == []
        async with Peer.open(d.ws_url("globex", "u2", 0), "globex", "u2") as g2:
            replay = await g2.wait_for(lambda f: f["type"] == "notification")
            assert replay["id"] == queued["notification_id"]

        # Templates: same id in two tenants are two templates; no cross read/write/use.
        template = {"id": "welcome", "event_type": "globex.welcome",
                    "payload_template": {"tenant": "globex", "secret": "{{code}}"}}
        assert (await rec(globex.post("/api/v1/templates", json=template))).status_code == 201
        for client in (acme, operator_as_acme):
            assert (await rec(client.get("/api/v1/templates/welcome"))).status_code == 404
            assert (await rec(client.get("/api/v1/templates"))).json()["templates"] == []
            replaced = await rec(client.put("/api/v1/templates/welcome", json={
                "event_type": "pwned", "payload_template": {}}))
            assert replaced.status_code == 404
            assert (await rec(client.delete("/api/v1/templates/welcome"))).status_code == 404
            used = await rec(client.post("/api/v1/notifications/send", json={
                "target_user_id": "u1", "template_id": "welcome", "variables": {"code": 1}}))
            assert used.status_code == 404
            assert used.json()["error"]["code"] == "TEMPLATE_NOT_FOUND"
        own = {**template, "event_type": "acme.welcome", "payload_template": {"tenant": "acme"}}
        assert (await rec(acme.post("/api/v1/templates", json=own))).status_code == 201
        kept = (await rec(globex.get("/api/v1/templates/welcome"))).json()
        assert kept["event_type"] == "globex.welcome"

        # Idempotency keys are per tenant: the same key must not replay acme's answer to globex.
        same = {"Idempotency-Key": "shared-key-1"}
        body = {"target_user_id": "u1", "event_type": "idem", "payload": {"marker": "idem"}}
        first = (await rec(acme.post("/api/v1/notifications/send", json=body,
                                     headers=same))).json()
        second = (await rec(globex.post("/api/v1/notifications/send", json=body,
                                        headers=same))).json()
        assert first["notification_id"] != second["notification_id"]
        await a1.wait_for(lambda f: f.get("id") == first["notification_id"])
        await g1.wait_for(lambda f: f.get("id") == second["notification_id"])
        idem_ids = {"acme": first["notification_id"], "globex": second["notification_id"]}

        # Read views show acme only.
        channels = (await rec(acme.get("/api/v1/channels"))).json()
        assert [c["name"] for c in channels["channels"]] == ["orders"]
        assert channels["channels"][0]["subscriber_count"] == 1
        assert (await rec(acme.get("/api/v1/channels/globex-only"))).status_code == 404
        subs = (await rec(acme.get("/api/v1/users/u1/subscriptions"))).json()
        assert subs["subscriptions"] == ["orders"] and subs["connection_count"] == 1
        sessions = (await rec(acme.get("/api/v1/cluster/users/u1"))).json()["sessions"]
        assert [s["connection_id"] for s in sessions] == [a1.hello["connection_id"]]
        stats = (await rec(acme.get("/api/v1/stats"))).json()
        assert stats["connections"]["total"] == 1 and stats["channels"] == 1
        globex_stats = (await rec(globex.get("/stats"))).json()
        assert globex_stats["connections"]["total"] == 2
        acks = (await rec(acme.get("/api/v1/stats/acks"))).json()
        assert acks["acknowledged"] == 0
        tenants = (await rec(acme.get("/api/v1/tenants"))).json()
        assert [t["tenant_id"] for t in tenants["tenants"]] == ["acme"]
        assert (await rec(acme.get("/api/v1/tenants/globex"))).status_code == 403
        assert (await rec(acme.get("/api/v1/tenants/acme"))).json()["connections"] == 1

        # Subscribing by socket never crosses over: globex's 'orders' sends stayed in globex.
        await asyncio.sleep(d.settle)
        sse_frames = []
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            while True:
                event = await g1_sse.next(0.2)
                if event is None:
                    break
                sse_frames.append(event)
        for peer in (a1, g1):
            for frame in peer.notifications():
                assert frame["payload"].get("tenant", peer.tenant) == peer.tenant, (peer, frame)
                assert frame["id"] not in set(idem_ids.values()) - {idem_ids[peer.tenant]}
                if "channel" in frame["metadata"]:
                    assert frame["metadata"]["channel"] in ("orders", "globex-only")
        for event in sse_frames:
            if event.event == "notification":
                assert event.data["payload"].get("tenant", "globex") == "globex", event
                assert event.data["id"] != idem_ids["acme"]
        assert not any(a1.got(f"globex-{path}") for path, _ in sends)
        assert not a1.got(f"{batch_marker}-4")
        assert not g1.got(f"{batch_marker}-4") and not any(g1.got(m) for m in markers)
        assert any(e.event == "notification" for e in sse_frames)

        # No internal key, prefix or separator shows up anywhere an attacker can look.
        seen = rec.bodies + [json.dumps(f) for f in a1.frames + g1.frames]
        seen += [e.raw for e in sse_frames]
        for text in seen:
            assert not LEAK.search(text), text
            for prefix in d.internal_prefixes:
                assert prefix not in text, text
            assert ACME_KEY not in text and GLOBEX_KEY not in text

    if d.redis_url is not None:
        # API keys never become part of Redis key names (rate-limit buckets use a digest).
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(d.redis_url)
        try:
            names = [key async for key in client.scan_iter(count=1000)]
        finally:
            await client.aclose()
        assert any(b":rl:" in name for name in names), "no rate-limit bucket to inspect"
        for secret in (ACME_KEY, GLOBEX_KEY, d.global_key):
            assert not [n for n in names if secret.encode() in n], secret


async def test_tenant_claim_with_separators_cannot_alias_another_tenants_user(
    server_factory: ServerFactory,
) -> None:
    """'acme:bob' + 'x' and 'acme' + 'bob:x' would share the Redis key sess:{acme:bob:x}."""
    server = await server_factory(tenant_enabled=True)
    for tenant in ("acme:bob", "acme{x}", "acme|x", FULLWIDTH_ACME, "acme\x1f", "", "a" * 65):
        token = server.token("x", tenant=tenant) if tenant else hs(
            {"sub": "x", "tenant_id": "", "exp": int(time.time()) + 60})
        assert (await ws_rejection(server.ws_url(token))).status_code == 401, tenant
    async with server.ws("bob:x", tenant="acme") as ws:
        assert ws.hello["user_id"] == "bob:x"


# -- hostile input ---------------------------------------------------------------------


def nested(depth: int) -> Any:
    value: Any = {"leaf": True}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


async def test_oversized_and_deeply_nested_json_get_4xx_and_the_server_stays_up(
    server: EmbeddedServer,
) -> None:
    async with server.ws("victim") as victim:
        send = "/api/v1/notifications/send"
        base = {"target_user_id": "victim", "event_type": "e"}
        cases: list[tuple[str, Any, dict[str, str], int]] = [
            ("declared too large", json.dumps({**base, "payload": "x" * 70_000}), {}, 413),
            ("chunked too large", (b"x" for _ in range(1)), {}, 0),
            ("nested 65 deep", json.dumps({**base, "payload": nested(64)}), {}, 422),
            ("nested 300 deep", json.dumps({**base, "payload": nested(300)}), {}, 422),
            ("nested past the decoder", "[" * 5000 + "]" * 5000, {}, 400),
            ("lone surrogate", '{"target_user_id":"victim","event_type":"\\ud800"}', {}, 400),
            ("invalid utf-8", b'{"target_user_id":"\xff"}', {}, 400),
            ("infinity", '{"target_user_id":"victim","event_type":"e","ttl":1e400}', {}, 400),
            ("NaN literal", '{"target_user_id":"victim","event_type":"e","ttl":NaN}', {}, 400),
            ("not json", "target_user_id=victim", {"content-type": "text/plain"}, 415),
            ("empty", "", {}, 400),
            ("array body", "[]", {}, 422),
            ("huge user list", json.dumps({"target_user_ids": ["u"] * 10_001,
                                           "event_type": "e"}), {}, 422),
        ]
        for label, body, headers, expected in cases:
            if label == "chunked too large":
                async def chunks() -> AsyncIterator[bytes]:
                    for _ in range(20):
                        yield b" " * 8192
                response = await server.client.post(send, content=chunks(),
                                                    headers={"content-type": "application/json"})
                expected = 413
            else:
                path = send if "user list" not in label else "/api/v1/notifications/send-to-users"
                response = await server.client.post(path, content=body, headers=headers)
            assert response.status_code == expected, (label, response.status_code, response.text)
            assert response.json()["error"]["code"], label
        big_batch = {"notifications": [{"target": {"type": "user", "value": "victim"},
                                        "event_type": "e", "payload": "x" * 11_000}] * 100}
        response = await server.post("/api/v1/notifications/batch", big_batch)
        assert response.status_code == 413
        deep_batch = {"notifications": [{"target": {"type": "user", "value": "victim"},
                                         "event_type": "e", "payload": nested(200)}]}
        response = await server.post("/api/v1/notifications/batch", deep_batch,
                                     headers={"Idempotency-Key": "deep"})
        assert response.status_code == 422
        response = await server.post("/api/v1/templates", {
            "id": "deep", "event_type": "e", "payload_template": nested(100)})
        assert response.status_code == 422
        response = await server.client.post("/sse/ack", content="x" * 5000, headers={
            "Authorization": f"Bearer {server.token('victim')}"})
        assert response.status_code == 413

        # Just inside the limit is accepted and arrives intact.
        deepest = nested(62)
        sent = await server.send_to_user("victim", payload=deepest)
        got = await victim.expect("notification")
        assert got["id"] == sent["notification_id"] and got["payload"] == deepest

        # Sockets: a deeply nested frame is an error frame, an oversized one closes 1009.
        deep_list = "[" * 1000 + "]" * 1000
        for frame in ('{"type":"Subscribe","payload":{"channels":[' + deep_list + "]}}",
                      '{"type":' + deep_list + "}",
                      '{"type":"Ack","payload":{"notification_id":' + json.dumps(nested(500))
                      + "}}"):
            await victim.send_text(frame)
            error = await victim.expect("error")
            assert error["code"] in ("SUBSCRIPTION_ERROR", "INVALID_MESSAGE")
            assert len(error["message"]) < 300
        await victim.send_json({"type": "Ping"})
        await victim.expect("pong")
    async with server.ws("big") as big:
        await big.send_text(json.dumps({"type": "Ping", "pad": "x" * 70_000}))
        assert await big.wait_closed() == 1009
    assert (await server.get("/health")).status_code == 200


async def test_huge_urls_and_headers_are_refused_before_the_app(server: EmbeddedServer) -> None:
    async def raw(request: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(request)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            return await asyncio.wait_for(reader.read(200), 5)
        finally:
            writer.close()

    token = server.token("u1")
    long_channels = ",".join(f"c{i}" for i in range(40_000))
    answers = [
        await raw(f"GET /sse?token={token}&channels={long_channels} HTTP/1.1\r\n"
                  "Host: x\r\n\r\n".encode()),
        await raw(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Flood: " + b"a" * 200_000 + b"\r\n\r\n"),
        await raw(b"GET /health HTTP/1.1\r\n" + b"X-Many: a\r\n" * 5000 + b"\r\n"),
    ]
    for answer in answers:
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, answer
    async with sse_connect(server.sse_url(token, ",".join(f"c{i}" for i in range(51))),
                           connected=False) as sse:
        assert sse.response.status_code == 422
    assert (await server.get("/health")).status_code == 200


async def sse_status(server: EmbeddedServer, params: dict[str, str]) -> int:
    query = {"token": server.token(f"sse-{uuid.uuid4().hex[:6]}"), **params}
    async with httpx.AsyncClient(timeout=5) as http:
        async with http.stream("GET", server.base_url + "/sse", params=query) as response:
            return response.status_code


BAD_CHANNELS = [
    "acme:orders", "orders:*", "{orders}", "a|b", "a\x1fb", "a/b", "a b", "a,b", "*", "",
    "x" * 65, CYRILLIC_ORDERS, FULLWIDTH_ORDERS, "orders\u200b", "\u202eorders", "orders\x00",
    "or\nders", "\u00f6rd\u00e9rs",
]


async def test_channel_names_built_to_collide_are_refused_everywhere(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(tenant_enabled=True)
    async with server.ws("u1", tenant="acme") as ws, server.ws("u2") as bystander:
        await ws.send_json({"type": "Subscribe",
                            "payload": {"channels": ["orders", *BAD_CHANNELS]}})
        subscribed = await ws.expect("subscribed")
        assert subscribed["payload"] == ["orders"]
        error = await ws.expect("error")
        assert error["code"] == "SUBSCRIPTION_ERROR"
        await bystander.send_json({"type": "Subscribe", "payload": {"channels": ["orders"]}})
        await bystander.expect("subscribed")
        for name in BAD_CHANNELS:
            response = await server.post("/api/v1/notifications/channel",
                                         {"channel": name, "event_type": "e"},
                                         headers={"X-Tenant-ID": "acme"})
            assert response.status_code == 422, repr(name)
            response = await server.post("/api/v1/notifications/channels",
                                         {"channels": ["orders", name], "event_type": "e"})
            assert response.status_code == 422, repr(name)
            # On SSE ',' separates names, so 'a,b' is two valid names and '' is none.
            expected = 200 if name in ("a,b", "") else 422
            assert await sse_status(server, {"channels": name}) == expected, repr(name)
        for name in ("acme:orders", "%7Borders%7D", "orders%00", "..%2F..%2Fadmin"):
            response = await server.get(f"/api/v1/channels/{name}",
                                        headers={"X-Tenant-ID": "acme"})
            assert response.status_code == 404, name
        # 'acme' + 'orders' must not be reachable as default tenant channel 'acme:orders'.
        response = await server.post("/api/v1/notifications/channel",
                                     {"channel": "orders", "event_type": "acme-only"},
                                     headers={"X-Tenant-ID": "acme"})
        assert response.json()["delivered_to"] == 1
        got = await ws.expect("notification")
        assert got["metadata"]["channel"] == "orders"
        await bystander.assert_silent(0.3)
        # Case and look-alikes are different channels, not aliases.
        response = await server.post("/api/v1/notifications/channel",
                                     {"channel": "Orders", "event_type": "e"})
        assert response.json()["delivered_to"] == 0


async def test_user_ids_that_look_alike_are_different_users(server: EmbeddedServer) -> None:
    async with server.ws("alice") as alice, server.ws("Alice") as upper, \
            server.ws(FULLWIDTH_ALICE) as wide:
        sent = await server.send_to_user("alice", payload={"for": "alice"})
        assert sent["delivered_to"] == 1
        assert (await alice.expect("notification"))["payload"] == {"for": "alice"}
        await upper.assert_silent(0.2)
        await wide.assert_silent(0.2)
    for user in ("alice\u200b", "alice\x00", "alice\n", "a" * 257, ""):
        response = await server.post("/api/v1/notifications/send",
                                     {"target_user_id": user, "event_type": "e"})
        assert response.status_code == 422, repr(user)


# -- slow clients ----------------------------------------------------------------------


async def test_slowloris_connections_do_not_starve_other_clients(server: EmbeddedServer) -> None:
    writers: list[asyncio.StreamWriter] = []
    try:
        for i in range(150):
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            if i % 3 == 0:
                writer.write(b"GET /api/v1/stats HTTP/1.1\r\nHost: x\r\nX-API-")
            elif i % 3 == 1:
                writer.write(b"POST /api/v1/notifications/send HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 60000\r\n"
                             + f"X-API-Key: {TEST_API_KEY}\r\n\r\n".encode() + b'{"target')
            else:
                writer.write(b"GET /ws?token=")
            writers.append(writer)
        async with server.ws("patient") as ws:
            for _ in range(10):
                for writer in writers[:50]:
                    writer.write(b"a")
                started = time.monotonic()
                response = await server.get("/api/v1/stats")
                assert response.status_code == 200
                await ws.send_json({"type": "Ping"})
                await ws.expect("pong", 2)
                sent = await server.send_to_user("patient")
                assert (await ws.expect("notification", 2))["id"] == sent[
                    "notification_id"]
                assert time.monotonic() - started < 1.0
        async with server.ws("newcomer") as late:
            assert late.hello["type"] == "connected"
    finally:
        for writer in writers:
            writer.close()
    await eventually(lambda: len(server.node.manager) == 0)


# -- API keys -------------------------------------------------------------------------


def test_api_key_checks_compare_every_key_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings(api_key="global-key-0123456789", jwt_secret=TEST_JWT_SECRET,
                             tenant_api_keys="a:key-a-0123456789,b:key-b-0123456789")
    checker = ApiKeyChecker(settings)
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(common.auth.hmac, "compare_digest", spy)
    for presented, bound in [("global-key-0123456789", None), ("key-a-0123456789", "a"),
                             ("key-b-0123456789", "b"), ("global-key-012345678X", "bad"),
                             ("g", "bad"), ("x" * 4096, "bad")]:
        calls.clear()
        if bound == "bad":
            with pytest.raises(common.auth.ApiError):
                checker.check(presented)
        else:
            assert checker.check(presented).bound_tenant == bound
        assert len(calls) == 3, "every configured key is compared, whichever matches"
        assert {b for _, b in calls} == {b"global-key-0123456789", b"key-a-0123456789",
                                         b"key-b-0123456789"}
    # No key comparison bypasses hmac.compare_digest (no ==, !=, in, startswith on keys).
    tree = ast.parse(inspect.getsource(ApiKeyChecker))
    compared = [node for node in ast.walk(tree) if isinstance(node, ast.Compare)]
    for node in compared:
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        assert not names & {"candidate", "presented", "key"}, ast.unparse(node)
    calls_by_name = {n.func.attr for n in ast.walk(tree)
                     if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert not calls_by_name & {"startswith", "endswith", "find", "index"}


async def test_guessing_api_keys_is_rate_limited_per_client_not_per_guess(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(ratelimit_http_requests_per_second=1,
                                  ratelimit_http_burst_size=20)
    async with server.http(headers={}) as http:
        statuses = []
        for i in range(40):
            response = await http.get("/api/v1/stats", headers={"X-API-Key": f"guess-{i:04d}"})
            statuses.append(response.status_code)
        assert statuses.count(401) <= 21 and statuses.count(429) >= 19, statuses
        assert (await http.get("/api/v1/stats", params={"api_key": TEST_API_KEY})
                ).status_code == 429
        # The real key has its own bucket, untouched by the attacker's guesses.
        ok = await http.get("/api/v1/stats", headers={"X-API-Key": TEST_API_KEY})
        assert ok.status_code == 200
    for presented in (TEST_API_KEY.upper(), TEST_API_KEY[:-1], TEST_API_KEY + "x"):
        async with server.http(headers={"X-API-Key": presented}) as http:
            assert (await http.get("/api/v1/channels")).status_code in (401, 429)


# -- error masking ----------------------------------------------------------------------


async def test_production_masks_internal_errors_and_development_explains_them(
    server_factory: ServerFactory,
) -> None:
    secret = "password=hunter2 at db.internal:5432"

    async def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(secret)

    strong = "prod-jwt-secret-" + "k" * 40
    prod = await server_factory(run_mode="production", jwt_secret=strong,
                                api_key=TEST_API_KEY)
    dev = await server_factory()
    for server in (prod, dev):
        server.node.backends.templates.list = explode  # type: ignore[method-assign]
        server.node.backends.receipts.get = explode  # type: ignore[method-assign]
    for path in ("/api/v1/templates", f"/api/v1/notifications/{uuid.uuid4()}"):
        masked = await prod.get(path)
        assert masked.status_code == 500
        assert masked.json() == {"error": {"code": "INTERNAL_ERROR",
                                           "message": "Internal server error"}}
        assert "hunter2" not in masked.text and "Traceback" not in masked.text
        assert "RuntimeError" not in masked.text
        explained = await dev.get(path)
        assert explained.status_code == 500
        assert explained.json()["error"]["message"] == f"RuntimeError: {secret}"
    # Errors that are the client's fault stay precise in production, without echoing input.
    response = await prod.post("/api/v1/notifications/send",
                               {"target_user_id": "u1", "event_type": "e", "ttl": "hunter2"})
    assert response.status_code == 422 and "hunter2" not in response.text
    assert (await prod.get("/api/v1/nope")).json()["error"]["code"] == "NOT_FOUND"
    health = (await prod.get("/health")).json()
    assert "hunter2" not in json.dumps(health)

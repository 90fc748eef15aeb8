"""Authentication of sockets (JWT) and of the REST API (API key), PROTOCOL §1."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import jwt
import pytest
from conftest import (
    TEST_API_KEY,
    TEST_JWT_SECRET,
    EmbeddedServer,
    ServerFactory,
    rsa_pair,
    sse_connect,
    ws_connect,
    ws_rejection,
)


def hs256(claims: dict, secret: str = TEST_JWT_SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def unsigned(claims: dict) -> str:
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def claims(**extra: object) -> dict:
    now = int(time.time())
    return {"sub": "u1", "iat": now, "exp": now + 600, **extra}


async def assert_ws_401(server: EmbeddedServer, token: str | None) -> str:
    refused = await ws_rejection(server.ws_url(token))
    assert refused.status_code == 401
    error = refused.json()["error"]
    assert error["code"] == "UNAUTHORIZED"
    return str(error["message"])


async def assert_sse_401(server: EmbeddedServer, token: str | None) -> None:
    async with sse_connect(server.sse_url(token), connected=False) as sse:
        assert sse.response.status_code == 401
        await sse.response.aread()
        assert sse.response.json()["error"]["code"] == "UNAUTHORIZED"


BAD_HS256_TOKENS = {
    "garbage": "not-a-jwt",
    "wrong secret": hs256(claims(), "another-secret-another-secret-another-secret"),
    "expired": hs256(claims(exp=int(time.time()) - 3600)),
    "no exp": hs256({"sub": "u1"}),
    "no sub": hs256({"exp": int(time.time()) + 600}),
    "not yet valid": hs256(claims(nbf=int(time.time()) + 3600)),
    "alg none": unsigned(claims()),
    "empty sub": hs256(claims(sub="")),
    "roles not a list": hs256(claims(roles="admin")),
}


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("label", sorted(BAD_HS256_TOKENS))
async def test_bad_token_gets_401_before_any_upgrade(
    shared_server: EmbeddedServer, label: str,
) -> None:
    token = BAD_HS256_TOKENS[label]
    await assert_ws_401(shared_server, token)
    await assert_sse_401(shared_server, token)


@pytest.mark.asyncio(loop_scope="module")
async def test_missing_token_gets_401_on_ws_and_sse(shared_server: EmbeddedServer) -> None:
    assert "missing" in await assert_ws_401(shared_server, None)
    await assert_sse_401(shared_server, None)
    response = await shared_server.post("/sse/ack", {"notification_id": "x"})
    assert response.status_code == 401


async def test_just_expired_token_is_refused_when_leeway_is_zero(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(jwt_leeway_seconds=0)
    token = hs256(claims(exp=int(time.time()) - 2))
    assert "expired" in await assert_ws_401(server, token)


async def test_rs256_accepts_signed_tokens_and_rejects_hs256_made_with_the_public_key(
    server_factory: ServerFactory, tmp_path: Path,
) -> None:
    private, public = rsa_pair()
    key_file = tmp_path / "public.pem"
    key_file.write_text(public)
    server = await server_factory(jwt_algorithm="RS256", jwt_public_key=str(key_file))
    good = jwt.encode(claims(sub="rs-user"), private, algorithm="RS256")
    async with ws_connect(server.ws_url(good)) as ws:
        assert ws.hello["user_id"] == "rs-user"
    # Algorithm confusion: the public key used as an HMAC secret.
    confused = jwt.api_jws.PyJWS()._algorithms["HS256"]  # raw HMAC, no key-type checks
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(claims()).encode()).rstrip(b"=")
    signing_input = header + b"." + body
    signature = confused.sign(signing_input, public.encode())
    forged = (signing_input + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()
    await assert_ws_401(server, forged)
    await assert_ws_401(server, unsigned(claims()))
    await assert_ws_401(server, hs256(claims()))
    other_private, _ = rsa_pair()
    await assert_ws_401(server, jwt.encode(claims(), other_private, algorithm="RS256"))


async def test_rs256_public_key_may_be_given_inline(server_factory: ServerFactory) -> None:
    private, public = rsa_pair()
    server = await server_factory(jwt_algorithm="RS256", jwt_public_key=public)
    token = jwt.encode(claims(sub="inline"), private, algorithm="RS256")
    async with sse_connect(server.sse_url(token)) as sse:
        assert sse.hello is not None and sse.hello.data["user_id"] == "inline"


async def test_issuer_and_audience_are_checked_when_configured(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(jwt_issuer="https://issuer.test", jwt_audience="ara")
    good = hs256(claims(iss="https://issuer.test", aud="ara"))
    async with ws_connect(server.ws_url(good)) as ws:
        assert ws.hello["user_id"] == "u1"
    await assert_ws_401(server, hs256(claims(iss="https://evil.test", aud="ara")))
    await assert_ws_401(server, hs256(claims(iss="https://issuer.test", aud="other")))
    await assert_ws_401(server, hs256(claims(aud="ara")))
    await assert_ws_401(server, hs256(claims(iss="https://issuer.test")))


async def test_tenant_and_roles_claims_are_taken_from_the_token(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory(tenant_enabled=True)
    async with server.ws("u1", tenant="acme", roles=["admin"]) as ws:
        conn = server.node.manager.by_id[ws.hello["connection_id"]]
        assert conn.tenant_id == "acme"
        assert conn.identity.roles == ("admin",)
    async with server.ws("u1") as ws:
        conn = server.node.manager.by_id[ws.hello["connection_id"]]
        assert conn.tenant_id == "default"


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong-key-wrong-key"},
                                     {"X-API-Key": ""}])
@pytest.mark.asyncio(loop_scope="module")
async def test_rest_api_needs_the_api_key(shared_server: EmbeddedServer, headers: dict) -> None:
    async with shared_server.http(headers=headers) as http:
        for method, path in [("GET", "/api/v1/channels"), ("GET", "/stats"),
                             ("GET", "/api/v1/stats"), ("POST", "/api/v1/notifications/send")]:
            response = await http.request(method, path, json={})
            assert response.status_code == 401, (method, path)
            assert response.json()["error"]["code"] == "UNAUTHORIZED"


@pytest.mark.asyncio(loop_scope="module")
async def test_probes_need_no_credentials(shared_server: EmbeddedServer) -> None:
    async with shared_server.http(headers={}) as http:
        for path in ("/health", "/ready", "/metrics"):
            assert (await http.get(path)).status_code == 200


async def test_tenant_bound_key_acts_only_in_its_tenant(server_factory: ServerFactory) -> None:
    server = await server_factory(tenant_enabled=True,
                                  tenant_api_keys="acme:acme-key-0123456789")
    async with server.ws("u1", tenant="acme") as acme, server.ws("u1") as default:
        async with server.http(headers={"X-API-Key": "acme-key-0123456789"}) as http:
            response = await http.post("/api/v1/notifications/send", json={
                "target_user_id": "u1", "event_type": "e", "payload": {}})
            assert response.json()["delivered_to"] == 1
            assert (await acme.expect("notification"))["event_type"] == "e"
            await default.assert_silent(0.2)
            forbidden = await http.get("/api/v1/channels", headers={"X-Tenant-ID": "default"})
            assert forbidden.status_code == 403
            assert (await http.get("/api/v1/tenants/default")).status_code == 403
            listed = (await http.get("/api/v1/tenants")).json()
            assert [t["tenant_id"] for t in listed["tenants"]] == ["acme"]
        async with server.http(headers={"X-API-Key": TEST_API_KEY}) as http:
            response = await http.post(
                "/api/v1/notifications/send",
                json={"target_user_id": "u1", "event_type": "global", "payload": {}},
                headers={"X-Tenant-ID": "acme"},
            )
            assert response.json()["delivered_to"] == 1
            assert (await acme.expect("notification"))["event_type"] == "global"

"""Schemathesis against the REST API, driven by the server's own ``/openapi.json``.

A real ``ara-notify serve`` child process (loopback, free port, killed by PID)
serves the document; Schemathesis loads it from there and generates requests
for every operation, valid ones and deliberately invalid ones (wrong types,
missing fields, odd headers, path parameters with separators). Every answer
must be:

- never a 5xx (``not_a_server_error``);
- for 4xx, the documented envelope ``{"error": {"code", "message"[, "details"]}}``;
- conformant to the document where it declares a schema (status codes,
  content types, response bodies).

Examples per operation are bounded so the module runs well under a minute.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from conftest import TEST_API_KEY, free_port, serve_env
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

# Run this checkout's code, whatever else is installed.
ROOT = Path(__file__).resolve().parent.parent
MAX_EXAMPLES = 25


@dataclass
class Node:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> None:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def api_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("fuzz-api")
    port = free_port()
    env = serve_env(tmp, port, LOG_LEVEL="ERROR", TENANT_ENABLED="true",
                    TENANT_API_KEYS="acme:acme-key-0123456789")
    log = tmp / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "common.cli", "serve"], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)
    node = Node(port, proc, log)
    try:
        deadline = time.monotonic() + 20
        while True:
            node.alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(node.base + "/ready", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield node
        node.alive()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def api_schema(api_node: Node) -> Any:
    return schemathesis.openapi.from_url(api_node.base + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schemathesis.check
def error_envelope(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx carries the PROTOCOL §7 error body."""
    if 400 <= response.status_code < 500:
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"}, body
        error = body["error"]
        assert isinstance(error.get("code"), str) and error["code"].isupper(), error
        assert isinstance(error.get("message"), str) and error["message"], error
        assert set(error) <= {"code", "message", "details"}, error
        if "details" in error:
            assert isinstance(error["details"], dict), error
    return None


CHECKS = [not_a_server_error, error_envelope, status_code_conformance,
          content_type_conformance, response_schema_conformance]


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_answers_within_its_contract(case: Any, api_node: Node) -> None:
    # Schemathesis fills X-API-Key from the security scheme with made-up values; the real
    # key goes on top so requests get past authentication (401s are covered elsewhere).
    case.call_and_validate(headers={"X-API-Key": TEST_API_KEY}, checks=CHECKS)


def test_the_served_document_is_the_one_fuzzed(api_node: Node) -> None:
    from gateway.openapi import build_openapi

    served = httpx.get(api_node.base + "/openapi.json", timeout=5).json()
    assert served == build_openapi()
    assert served["openapi"].startswith("3.1")
    api_node.alive()

"""Unit tests: the identity-forwarding request rewriter, client usage in the CA policy, ca serve's
plain-HTTP rule, metrics' refusal reasons."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from enclavekit.atls.ca import ca_policy_from_mapping
from enclavekit.atls.client_auth import (
    CLIENT_IDENTITY_HEADER,
    BadRequestHead,
    ClientIdentity,
    rewrite_request_head,
)
from enclavekit.atls.metrics import refusal_reason
from enclavekit.cli import cli
from enclavekit.errors import Failure, MalformedInput, PolicyViolation, VerificationError

IDENTITY = ClientIdentity(
    "caller", b"\x01" * 32, "i-0abc-enc0def", {0: b"\xaa" * 48, 5: b"\x05" * 48}
)


def _headers(head: bytes) -> list[tuple[bytes, bytes]]:
    lines = head.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]
    return [(n.lower(), v.strip()) for n, _, v in (line.partition(b":") for line in lines)]


def test_identity_header_value_format() -> None:
    assert IDENTITY.header_value() == (
        f"service=caller; cert-sha256={'01' * 32}; module-id=i-0abc-enc0def; pcr0={'aa' * 48}"
    )


@pytest.mark.parametrize(
    "name", [CLIENT_IDENTITY_HEADER, CLIENT_IDENTITY_HEADER.lower(), CLIENT_IDENTITY_HEADER.upper()]
)
def test_attack_client_sent_identity_header_is_removed(name: str) -> None:
    head = f"GET / HTTP/1.1\r\nHost: a\r\n{name}: service=admin".encode()
    new, length = rewrite_request_head(head, IDENTITY)
    values = [v for n, v in _headers(new) if n == CLIENT_IDENTITY_HEADER.lower().encode()]
    assert values == [IDENTITY.header_value().encode()]
    assert (b"connection", b"close") in _headers(new)
    assert length == 0


def test_attack_chunked_body_is_refused_so_no_second_request_can_follow() -> None:
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked"
    with pytest.raises(BadRequestHead) as info:
        rewrite_request_head(head, IDENTITY)
    assert info.value.status.startswith("411")


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6",
        b"GET / HTTP/1.1\r\nContent-Length: -1",
        b"GET / HTTP/1.1\r\n folded: header",
        b"GET / HTTP/1.1\r\nno colon",
        b"GET /",
    ],
)
def test_attack_ambiguous_heads_are_refused(head: bytes) -> None:
    with pytest.raises(BadRequestHead):
        rewrite_request_head(head, IDENTITY)


def test_content_length_is_returned() -> None:
    _, length = rewrite_request_head(b"POST /x HTTP/1.1\r\nContent-Length: 12", IDENTITY)
    assert length == 12


@given(st.binary(max_size=300))
def test_rewriter_never_lets_a_client_identity_through(head: bytes) -> None:
    try:
        new, _ = rewrite_request_head(head, IDENTITY)
    except BadRequestHead:
        return
    names = [n for n, _ in _headers(new)]
    assert names.count(CLIENT_IDENTITY_HEADER.lower().encode()) == 1
    assert _headers(new)[-2] == (
        CLIENT_IDENTITY_HEADER.lower().encode(),
        IDENTITY.header_value().encode(),
    )


def test_ca_policy_client_usage_needs_no_dns_names() -> None:
    policy = ca_policy_from_mapping(
        {"services": {"caller": {"usage": "client", "pcrs": [{"0": "aa" * 48}]}}}
    )
    assert policy.services["caller"].usage == "client"
    assert policy.services["caller"].dns_names == ()


def test_ca_policy_rejects_unknown_usage_and_server_without_names() -> None:
    from enclavekit.errors import UsageError

    with pytest.raises(UsageError, match="usage"):
        ca_policy_from_mapping(
            {"services": {"x": {"usage": "both", "dns_names": ["a"], "pcrs": [{"0": "aa" * 48}]}}}
        )
    with pytest.raises(UsageError, match="dns_names"):
        ca_policy_from_mapping({"services": {"x": {"pcrs": [{"0": "aa" * 48}]}}})


def test_refusal_reasons_are_fixed_labels() -> None:
    assert refusal_reason(MalformedInput("x")) == "malformed_input"
    assert refusal_reason(VerificationError("x")) == "verification"
    assert refusal_reason(PolicyViolation([Failure("PCR0", "a", "b")])) == "policy_violation"
    assert refusal_reason(PolicyViolation([Failure("service", "a", "b")])) == "unknown_service"


def test_attack_ca_serve_refuses_plain_http_off_loopback(tmp_path: Path) -> None:
    r = CliRunner().invoke(
        cli,
        ["ca", "serve", "--listen", "0.0.0.0:0", "--state-dir", str(tmp_path), "--policy",
         str(tmp_path / "p.yaml")],
    )  # fmt: skip
    assert r.exit_code == 2
    assert "--tls" in r.output and "not a loopback" in r.output


def test_ca_serve_unsafe_plain_http_warns(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("services: {}\n")
    r = CliRunner().invoke(
        cli,
        ["ca", "serve", "--listen", "0.0.0.0:0", "--unsafe-plain-http", "--state-dir",
         str(tmp_path / "none"), "--policy", str(tmp_path / "p.yaml")],
    )  # fmt: skip
    assert r.exit_code == 2  # no CA in the state dir; the warning came first
    assert "in clear" in r.output


def test_atls_proxy_needs_exactly_one_certificate_source() -> None:
    base = ["atls", "proxy", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1"]
    r = CliRunner().invoke(cli, base)
    assert r.exit_code == 2 and "exactly one of --ca" in r.output
    r = CliRunner().invoke(cli, [*base, "--ca", "http://x", "--acme", "https://y"])
    assert r.exit_code == 2
    r = CliRunner().invoke(cli, [*base, "--acme", "https://y", "--domain", "a.example"])
    assert r.exit_code == 2 and "--acme-http-listen" in r.output
    r = CliRunner().invoke(cli, [*base, "--ca", "http://x", "--name", "w", "--client-policy", "p"])
    assert r.exit_code == 2 and "--client-ca" in r.output


# ---- the verdict cache gives the uncached verdict ----------------------------------------------

from hypothesis import HealthCheck, settings  # noqa: E402

from enclavekit.atls.ca import CaPolicy, Issuer, NitroEvidenceVerifier, ServicePolicy  # noqa: E402
from enclavekit.atls.client_auth import ClientAuthPolicy, ClientRefused  # noqa: E402
from enclavekit.attestation.policy import PcrsEqual  # noqa: E402
from tests.unit.atls.atls_support import PCRS, make_csr, spki  # noqa: E402

OTHER = {0: b"\x99" * 48, 1: PCRS[1], 2: PCRS[2]}


@pytest.fixture
def client_certs(ca_keys, store, factory, clock):  # type: ignore[no-untyped-def]
    allow = {0: PCRS[0], 1: PCRS[1], 2: PCRS[2]}
    policy = CaPolicy(
        services={
            "caller": ServicePolicy("caller", (), (allow,), usage="client"),
            "other": ServicePolicy("other", (), ({0: OTHER[0]},), usage="client"),
            "web": ServicePolicy("web", ("localhost",), (allow,)),
        }
    )
    issuer = Issuer(ca_keys, policy, store, NitroEvidenceVerifier(factory.verifier()), clock=clock)
    out = {}
    for service, pcrs in (("caller", PCRS), ("other", {**PCRS, **OTHER}), ("web", PCRS)):
        csr, key = make_csr(cn=service)
        doc = factory.make(public_key=spki(key), nonce=issuer.new_challenge().nonce, pcrs=pcrs)
        out[service] = issuer.issue(service, csr, doc).certificate.public_bytes(
            serialization.Encoding.DER
        )
    out["none"] = b""
    return out


def _verdict(fn, der):  # type: ignore[no-untyped-def]
    try:
        identity = fn(der)
    except ClientRefused as exc:
        return ("refused", exc.reason)
    return ("ok", identity)


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.lists(st.sampled_from(["caller", "other", "web", "none"]), max_size=12))
def test_verdict_cache_gives_the_same_verdict_as_no_cache(client_certs, factory, ca_keys, order):  # type: ignore[no-untyped-def]
    cached = ClientAuthPolicy([ca_keys.root], factory.verifier(), PcrsEqual({0: PCRS[0]}))
    fresh = ClientAuthPolicy([ca_keys.root], factory.verifier(), PcrsEqual({0: PCRS[0]}))
    for name in order:
        der = client_certs[name]
        assert _verdict(cached.check, der) == _verdict(fresh.verify_certificate, der)
    assert _verdict(cached.check, client_certs["caller"])[0] == "ok"
    assert _verdict(cached.check, client_certs["web"]) == ("refused", "usage")
    assert _verdict(cached.check, client_certs["other"]) == ("refused", "policy")

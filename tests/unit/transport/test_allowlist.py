"""nitro-cli allowlist format and matching semantics."""

from __future__ import annotations

import contextlib
import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavekit.errors import MalformedInput, UsageError
from enclavekit.transport.allowlist import (
    MAX_CONFIG_BYTES,
    Allowlist,
    AllowlistEntry,
    IPAddress,
    IpFamily,
    resolve,
)
from enclavekit.transport.errors import TargetNotAllowed

KMS_YAML = """\
allowlist:
- {address: kms.us-east-1.amazonaws.com, port: 443}
- {address: kms-fips.us-east-1.amazonaws.com, port: 443}
- address: 10.0.0.5
  port: 8443
"""

ZONE: dict[str, tuple[IPAddress, ...]] = {
    "kms.us-east-1.amazonaws.com": (ipaddress.ip_address("52.0.0.1"),),
    "alias.example": (ipaddress.ip_address("52.0.0.1"),),
    "v6only.example": (ipaddress.ip_address("2001:db8::1"),),
    "dual.example": (ipaddress.ip_address("192.0.2.7"), ipaddress.ip_address("2001:db8::7")),
}


def fake_resolver(host: str, family: IpFamily) -> tuple[IPAddress, ...]:
    try:
        found: tuple[IPAddress, ...] = (ipaddress.ip_address(host),)
    except ValueError:
        if host not in ZONE:
            raise UsageError(f"DNS lookup of {host!r} failed") from None
        found = ZONE[host]
    if family is IpFamily.IPV4:
        found = tuple(ip for ip in found if ip.version == 4)
    if family is IpFamily.IPV6:
        found = tuple(ip for ip in found if ip.version == 6)
    if not found:
        raise UsageError(f"{host!r} has no address of that family")
    return found


def test_parses_the_nitro_cli_format() -> None:
    allowlist = Allowlist.from_yaml(KMS_YAML)
    assert allowlist.entries[0] == AllowlistEntry("kms.us-east-1.amazonaws.com", 443)
    assert allowlist.entries[2] == AllowlistEntry("10.0.0.5", 8443)


def test_host_name_match() -> None:
    allowlist = Allowlist.from_yaml(KMS_YAML)
    ip = allowlist.check("kms.us-east-1.amazonaws.com", 443, resolver=fake_resolver)
    assert ip == ipaddress.ip_address("52.0.0.1")


def test_host_name_match_ignores_case_and_trailing_dot() -> None:
    allowlist = Allowlist.from_yaml(KMS_YAML)
    allowlist.check(
        "KMS.us-east-1.amazonaws.com.", 443, resolver=lambda h, f: ZONE["alias.example"]
    )


def test_ip_match_through_dns() -> None:
    """A target named differently but resolving to an allowed entry's address is allowed."""
    allowlist = Allowlist.from_yaml(KMS_YAML)
    assert allowlist.check("alias.example", 443, resolver=fake_resolver) == ipaddress.ip_address(
        "52.0.0.1"
    )


def test_ip_literal_entry_matches_literal_target() -> None:
    allowlist = Allowlist.from_yaml(KMS_YAML)
    assert allowlist.check("10.0.0.5", 8443, resolver=fake_resolver)


def test_unlisted_target_is_refused() -> None:
    """Egress bypass: a host not in the allowlist is refused with every reason listed."""
    allowlist = Allowlist.from_yaml(KMS_YAML)
    with pytest.raises(TargetNotAllowed) as info:
        allowlist.check("dual.example", 443, resolver=fake_resolver)
    assert info.value.exit_code == 1
    assert "kms.us-east-1.amazonaws.com:443" in str(info.value)


def test_listed_host_on_other_port_is_refused() -> None:
    """Port hopping: an allowed host on an unlisted port is refused."""
    allowlist = Allowlist.from_yaml(KMS_YAML)
    with pytest.raises(TargetNotAllowed):
        allowlist.check("kms.us-east-1.amazonaws.com", 22, resolver=fake_resolver)


def test_empty_allowlist_refuses_everything() -> None:
    for text in ("allowlist: []", "allowlist:"):
        with pytest.raises(TargetNotAllowed, match="empty allowlist"):
            Allowlist.from_yaml(text).check("127.0.0.1", 80, resolver=fake_resolver)


def test_unresolvable_entry_is_skipped_and_reported() -> None:
    allowlist = Allowlist((AllowlistEntry("gone.example", 443), AllowlistEntry("10.0.0.5", 443)))
    assert allowlist.check("10.0.0.5", 443, resolver=fake_resolver)
    with pytest.raises(TargetNotAllowed) as info:
        allowlist.check("192.0.2.1", 443, resolver=fake_resolver)
    assert any("gone.example" in f.check for f in info.value.failures)


def test_address_family_restricts_resolution() -> None:
    allowlist = Allowlist((AllowlistEntry("dual.example", 443),))
    assert allowlist.check("dual.example", 443, IpFamily.IPV6, resolver=fake_resolver).version == 6
    assert allowlist.check("dual.example", 443, IpFamily.IPV4, resolver=fake_resolver).version == 4
    with pytest.raises(UsageError):
        allowlist.check("v6only.example", 443, IpFamily.IPV4, resolver=fake_resolver)


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        "just a string",
        "other: 1",
        "allowlist: {address: a, port: 1}",
        "allowlist: [5]",
        "allowlist: [{address: '', port: 1}]",
        "allowlist: [{address: h}]",
        "allowlist: [{address: h, port: 0}]",
        "allowlist: [{address: h, port: 70000}]",
        "allowlist: [{address: h, port: true}]",
        "allowlist: [{address: h, port: '443'}]",
        "allowlist: [{address: 5, port: 443}]",
        "allowlist: [unclosed",
    ],
)
def test_malformed_allowlists_are_refused(text: str) -> None:
    with pytest.raises(MalformedInput):
        Allowlist.from_yaml(text)


def test_oversized_allowlist_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(MalformedInput, match="larger"):
        Allowlist.load(path)


def test_missing_allowlist_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--config"):
        Allowlist.load(tmp_path / "nope.yaml")


def test_yaml_tags_are_not_executed() -> None:
    """YAML deserialisation attack: python tags are not constructed (safe_load)."""
    with pytest.raises(MalformedInput):
        Allowlist.from_yaml("allowlist: !!python/object/apply:os.system ['true']")


def test_system_resolver_literals_and_localhost() -> None:
    assert resolve("127.0.0.1") == (ipaddress.ip_address("127.0.0.1"),)
    assert resolve("[::1]", IpFamily.IPV6) == (ipaddress.ip_address("::1"),)
    with pytest.raises(UsageError):
        resolve("127.0.0.1", IpFamily.IPV6)
    assert ipaddress.ip_address("127.0.0.1") in resolve("localhost", IpFamily.IPV4)
    with pytest.raises(UsageError, match="DNS lookup"):
        resolve("no-such-host.invalid")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["allowlist", "address", "port", "x"]), children, max_size=4
        )
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(_json)
def test_random_structures_only_raise_malformed(obj: object) -> None:
    with contextlib.suppress(MalformedInput):
        Allowlist.from_mapping(obj)

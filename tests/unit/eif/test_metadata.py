"""The metadata section: strict parsing (spec eif.md §4) and the custom-metadata file."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from enclavekit.eif.metadata import (
    BuildInfo,
    IdentityInfo,
    load_custom_metadata,
    rfc3339_now,
)
from enclavekit.errors import MalformedInput

GOOD = {
    "ImageName": "img",
    "ImageVersion": "1",
    "BuildMetadata": {
        "BuildTime": "t",
        "BuildTool": "nitro-cli",
        "BuildToolVersion": "1.4.2",
        "OperatingSystem": "Linux",
        "KernelVersion": "4.14.256",
    },
    "DockerInfo": None,
    "CustomMetadata": None,
}


def encode(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_nitro_cli_metadata_parses() -> None:
    info = IdentityInfo.from_bytes(encode(GOOD))
    assert info.build_info == BuildInfo("t", "nitro-cli", "1.4.2", "Linux", "4.14.256")


def test_unknown_extra_keys_are_tolerated_like_serde() -> None:
    assert IdentityInfo.from_bytes(encode({**GOOD, "Extra": 1})).image_name == "img"


@pytest.mark.parametrize("missing", ["ImageName", "BuildMetadata", "DockerInfo", "CustomMetadata"])
def test_missing_top_level_keys_are_refused(missing: str) -> None:
    bad = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(MalformedInput, match=missing):
        IdentityInfo.from_bytes(encode(bad))


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"[]",
        b"\xff\xfe",
        encode({**GOOD, "ImageName": 5}),
        encode({**GOOD, "BuildMetadata": {"BuildTime": "t"}}),
        encode({**GOOD, "BuildMetadata": []}),
        b'{"ImageName": "a", "ImageName": "b"}',
        b"[" * 100_000,
    ],
)
def test_malformed_metadata_is_refused(bad: bytes) -> None:
    with pytest.raises(MalformedInput):
        IdentityInfo.from_bytes(bad)


def test_duplicate_keys_in_metadata_are_refused() -> None:
    """A duplicated key (two readers could pick different values) is refused."""
    raw = encode(GOOD).replace(b'"ImageName": "img"', b'"ImageName": "img", "ImageName": "evil"')
    with pytest.raises(MalformedInput, match="duplicate"):
        IdentityInfo.from_bytes(raw)


def test_oversized_metadata_is_refused() -> None:
    with pytest.raises(MalformedInput, match="at most"):
        IdentityInfo.from_bytes(b" " * (2 << 20))


def test_unicode_is_written_unescaped_like_serde_json() -> None:
    info = IdentityInfo("bild-ä", "1", BuildInfo("t"), custom_metadata={"k": "\n"})
    raw = info.to_bytes()
    assert "bild-ä".encode() in raw and b'"k":"\\n"' in raw


def test_custom_metadata_file_rules() -> None:
    assert load_custom_metadata(b'{"b": 1, "a": [1, 2]}') == {"b": 1, "a": [1, 2]}
    with pytest.raises(MalformedInput, match="4096"):
        load_custom_metadata(b" " * 4097)
    with pytest.raises(MalformedInput, match="JSON"):
        load_custom_metadata(b"{")


def test_build_time_format_matches_chrono_rfc3339() -> None:
    moment = datetime(2024, 6, 21, 10, 0, 0, 123456, tzinfo=UTC)
    assert rfc3339_now(moment) == "2024-06-21T10:00:00.123456+00:00"

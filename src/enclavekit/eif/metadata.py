"""The metadata section (``EifIdentityInfo`` JSON, spec ``eif.md`` §4).

Bytes are compact serde_json: top-level keys ``ImageName, ImageVersion, BuildMetadata, DockerInfo,
CustomMetadata`` in that order, ``BuildMetadata`` keys ``BuildTime, BuildTool, BuildToolVersion,
OperatingSystem, KernelVersion`` in that order, and every object inside
``DockerInfo``/``CustomMetadata`` with keys sorted (serde_json without ``preserve_order``). The
metadata is never measured.

What is *not* reproduced: serde_json's float formatting (``1e16`` vs Python's ``1e+16``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from enclavekit import __version__
from enclavekit.errors import MalformedInput

#: nitro-cli limits the ``--metadata`` file to this many bytes.
CUSTOM_METADATA_MAX_SIZE = 4096
#: Refuse metadata sections larger than this when reading (nitro-cli's are a few KiB).
METADATA_MAX_SIZE = 1 << 20

_BUILD_KEYS = ("BuildTime", "BuildTool", "BuildToolVersion", "OperatingSystem", "KernelVersion")
_TOP_KEYS = ("ImageName", "ImageVersion", "BuildMetadata", "DockerInfo", "CustomMetadata")


def rfc3339_now(now: datetime | None = None) -> str:
    """chrono's ``to_rfc3339()`` form nitro-cli stamps: ``YYYY-MM-DDTHH:MM:SS.ffffff+00:00``."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    return moment.isoformat(timespec="microseconds")


def sorted_json(value: Any) -> Any:
    """A JSON value with every object's keys sorted (serde_json's ``Value`` without
    preserve_order)."""
    if isinstance(value, dict):
        return {k: sorted_json(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [sorted_json(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class BuildInfo:
    """``BuildMetadata``: who built the image, when, with which kernel."""

    build_time: str
    build_tool: str = "enclavekit"
    build_tool_version: str = __version__
    operating_system: str = "Linux"
    kernel_version: str = "Unknown"

    def to_json(self) -> dict[str, str]:
        return dict(
            zip(
                _BUILD_KEYS,
                (
                    self.build_time,
                    self.build_tool,
                    self.build_tool_version,
                    self.operating_system,
                    self.kernel_version,
                ),
                strict=True,
            )
        )


@dataclass(frozen=True, slots=True)
class IdentityInfo:
    """The whole metadata section. ``docker_info``/``custom_metadata`` are JSON values (``None`` →
    null)."""

    image_name: str
    image_version: str
    build_info: BuildInfo
    docker_info: Any = None
    custom_metadata: Any = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object, keys in nitro-cli's order (nested DockerInfo/CustomMetadata keys
        sorted)."""
        return {
            "ImageName": self.image_name,
            "ImageVersion": self.image_version,
            "BuildMetadata": self.build_info.to_json(),
            "DockerInfo": sorted_json(self.docker_info),
            "CustomMetadata": sorted_json(self.custom_metadata),
        }

    def to_bytes(self) -> bytes:
        """Compact serde_json bytes (no spaces, no trailing newline, UTF-8 unescaped)."""
        return json.dumps(self.to_json(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> IdentityInfo:
        """Parse strictly as nitro-cli's reader does: all five top-level keys and the five
        BuildMetadata strings must be present; DockerInfo/CustomMetadata may be null. Duplicate keys
        are refused."""
        if len(data) > METADATA_MAX_SIZE:
            raise MalformedInput(
                f"EIF metadata section is {len(data)} bytes; at most {METADATA_MAX_SIZE} are "
                "accepted"
            )
        try:
            obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise MalformedInput(f"EIF metadata section is not valid UTF-8 JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise MalformedInput("EIF metadata section: expected a JSON object")
        missing = [k for k in _TOP_KEYS if k not in obj]
        if missing:
            raise MalformedInput(f"EIF metadata section lacks {', '.join(missing)}")
        build = obj["BuildMetadata"]
        if not isinstance(build, dict):
            raise MalformedInput("EIF metadata: BuildMetadata must be an object")
        for key in _BUILD_KEYS:
            if not isinstance(build.get(key), str):
                raise MalformedInput(f"EIF metadata: BuildMetadata.{key} must be a string")
        for key in ("ImageName", "ImageVersion"):
            if not isinstance(obj[key], str):
                raise MalformedInput(f"EIF metadata: {key} must be a string")
        return cls(
            obj["ImageName"],
            obj["ImageVersion"],
            BuildInfo(*(build[k] for k in _BUILD_KEYS)),
            obj["DockerInfo"],
            obj["CustomMetadata"],
        )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def load_custom_metadata(data: bytes) -> Any:
    """Parse a ``--metadata`` file as nitro-cli does (JSON, at most 4096 bytes)."""
    if len(data) > CUSTOM_METADATA_MAX_SIZE:
        raise MalformedInput(
            f"the custom metadata file is {len(data)} bytes; nitro-cli accepts at most "
            f"{CUSTOM_METADATA_MAX_SIZE}"
        )
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedInput(f"the custom metadata file is not valid JSON: {exc}") from exc

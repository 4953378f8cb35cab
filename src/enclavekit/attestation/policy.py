"""Policies: composable checks applied to a :class:`VerifiedAttestation`.

A policy has one method, ``failures(verified) -> tuple[Failure, ...]``; an empty tuple means satisfied.
Policies accept only a ``VerifiedAttestation``, which only the verifier creates, so no policy can run on an
unverified document. Leaves compare raw bytes in constant time. Combinators keep the reasons of *every*
failed check (and of every branch of an :class:`AnyOf`).

Enclave PCR policies (:class:`PcrsEqual`, :class:`PcrAllowlist`, and every PCR set read from a file) are never
satisfied by a NitroTPM document, whatever its PCR values: a NitroTPM's PCRs are the EC2 instance's, extended
by its operating system. NitroTPM PCRs are checked only by :class:`NitroTpmPcrsEqual` (file key
``nitrotpm_pcrs``), which in turn is never satisfied by an enclave document.

Files: :func:`load_policy` reads JSON or YAML in enclavekit's format (see :func:`policy_from_mapping`) or
nitro-cli's ``build-enclave`` / ``describe-eif`` output (``{"Measurements": {...}}``).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import yaml

from enclavekit.attestation.document import DocumentKind
from enclavekit.attestation.verifier import VerifiedAttestation
from enclavekit.errors import Failure, UsageError

logger = logging.getLogger(__name__)

PCR_LENGTHS = (32, 48, 64)
#: Tolerated clock difference between the NSM and the verifier for documents "from the future".
DEFAULT_CLOCK_SKEW = timedelta(seconds=60)


@runtime_checkable
class Policy(Protocol):
    """What every policy implements."""

    def failures(self, verified: VerifiedAttestation) -> tuple[Failure, ...]:
        """Every failed check; empty when the policy is satisfied."""
        ...


def _hex(value: bytes | None) -> str:
    return "absent" if value is None else (value.hex() if value else "empty")


def _check_pcr_map(expected: Mapping[int, bytes], where: str) -> dict[int, bytes]:
    if not expected:
        raise ValueError(f"{where}: an empty PCR set would accept anything; give at least one PCR")
    out: dict[int, bytes] = {}
    for index, value in expected.items():
        if not isinstance(index, int) or not 0 <= index < 32:
            raise ValueError(f"{where}: PCR index {index!r} must be an integer 0..31")
        if not isinstance(value, bytes) or len(value) not in PCR_LENGTHS:
            raise ValueError(f"{where}: PCR{index} must be 32, 48 or 64 bytes")
        out[index] = value
    return dict(sorted(out.items()))


def _not_enclave(verified: VerifiedAttestation) -> tuple[Failure, ...]:
    """The failure of an enclave PCR check on a NitroTPM document (any mark of NitroTPM counts)."""
    if verified.is_nitrotpm or verified.kind is not DocumentKind.ENCLAVE:
        return (
            Failure(
                "document kind",
                "a Nitro Enclaves document (enclave PCRs)",
                f"a NitroTPM document ({verified.module_id}); its PCRs are an EC2 instance's TPM PCRs, "
                "not enclave measurements",
            ),
        )
    return ()


@dataclass(frozen=True, slots=True)
class PcrsEqual:
    """Each listed enclave PCR equals the expected value (any subset of indexes; unlisted PCRs are not
    checked). Never satisfied by a NitroTPM document."""

    expected: Mapping[int, bytes]

    def __post_init__(self) -> None:
        object.__setattr__(self, "expected", _check_pcr_map(self.expected, "PcrsEqual"))

    def failures(self, verified: VerifiedAttestation) -> tuple[Failure, ...]:
        wrong_kind = _not_enclave(verified)
        if wrong_kind:
            return wrong_kind
        out = []
        for index, want in self.expected.items():
            found = verified.pcrs.get(index)
            if found is None or not hmac.compare_digest(found, want):
                out.append(Failure(f"PCR{index}", want.hex(), _hex(found)))
        return tuple(out)


@dataclass(frozen=True, slots=True)
class PcrAllowlist:
    """The PCRs match at least one of several expected sets (rolling upgrades: old and new image)."""

    alternatives: tuple[PcrsEqual, ...]

    def __init__(self, alternatives: Iterable[Mapping[int, bytes] | PcrsEqual]) -> None:
        alts = tuple(a if isinstance(a, PcrsEqual) else PcrsEqual(a) for a in alternatives)
        if not alts:
            raise ValueError("PcrAllowlist needs at least one PCR set")
        object.__setattr__(self, "alternatives", alts)

    def failures(self, verified: VerifiedAttestation) -> tuple[Failure, ...]:
        wrong_kind = _not_enclave(verified)
        if wrong_kind:
            return wrong_kind
        collected: list[Failure] = []
        for number, alt in enumerate(self.alternatives, 1):
            branch = alt.failures(verified)
            if not branch:
                return ()
            collected += [
                Failure(
                    f"allowlist entry {number}/{len(self.alternatives)}: {f.check}",
                    f.expected,
                    f.found,
                )
                for f in branch
            ]
        return tuple(collected)


@dataclass(frozen=True, slots=True)
class NitroTpmPcrsEqual:
    """Each listed NitroTPM PCR (``nitrotpm_pcrs``) equals the expected value. Only for documents verified
    with ``allow_nitrotpm=True``; never satisfied by an enclave document.

    What a NitroTPM PCR proves is the EC2 instance's boot chain as its TPM measured it; PCR8-15 and 16/23
    are under the instance's operating system's control. Not checked: anything about an enclave."""

    expected: Mapping[int, bytes]

    def __post_init__(self) -> None:
        object.__setattr__(self, "expected", _check_pcr_map(self.expected, "NitroTpmPcrsEqual"))

    def failures(self, verified: VerifiedAttestation) -> tuple[Failure, ...]:
        if verified.kind is not DocumentKind.NITROTPM:
            return (
                Failure(
                    "document kind",
                    "a NitroTPM document (nitrotpm_pcrs)",
                    f"a Nitro Enclaves document ({verified.module_id})",
                ),
            )
        out = []
        for index, want in self.expected.items():
            found = verified.nitrotpm_pcrs.get(index)
            if found is None or not hmac.compare_digest(found, want):
                out.append(Failure(f"NitroTPM PCR{index}", want.hex(), _hex(found)))
        return tuple(out)


@dataclass(frozen=True, slots=True)
class _BytesEqual:
    name: str
    attribute: str
    expected: bytes

    def failures(self, verified: VerifiedAttestation) -> tuple[Failure, ...]:
        found = getattr(verified, self.attribute)
        if found is None or not hmac.compare_digest(found, self.expected):
            return (Failure(self.name, _hex(self.expected), _hex(found)),)
        return ()


def NonceEquals(nonce: bytes) -> _BytesEqual:
    """The document's nonce equals the verifier-issued challenge."""
    return _BytesEqual("nonce", "nonce", bytes(nonce))


def PublicKeyEquals(public_key: bytes) -> _BytesEqual:
    """The document's public_key equals the expected bytes (e.g. a DER SubjectPublicKeyInfo)."""
    return _BytesEqual("public_key", "public_key", bytes(public_key))


def UserDataEquals(user_data: bytes) -> _BytesEqual:
    """The document's user_data equals the expected bytes."""
    return _BytesEqual("user_data", "user_data", bytes(user_data))


@dataclass(frozen=True, slots=True)
class MaxAge:
    """The document is at most ``max_age`` old at verification time, and not from the future (+ skew)."""

    max_age: timedelta
    clock_skew: timedelta = DEFAULT_CLOCK_SKEW

    def __post_init__(self) -> None:
        if self.max_age <= timedelta(0):
            raise ValueError("MaxAge needs a positive duration")

    def failures(self, verified: VerifiedAttestation) -> tuple[Failure, ...]:
        age = verified.verified_at - verified.timestamp
        if age > self.max_age:
            return (
                Failure(
                    "max age",
                    f"at most {self.max_age.total_seconds():g} s old",
                    f"{age.total_seconds():.3f} s old (created {verified.timestamp.isoformat()})",
                ),
            )
        if -age > self.clock_skew:
            return (
                Failure(
                    "timestamp",
                    f"not after {verified.verified_at.isoformat()} (+{self.clock_skew.total_seconds():g} s)",
                    f"{verified.timestamp.isoformat()} (in the future)",
                ),
            )
        return ()


@dataclass(frozen=True, slots=True)
class NotDebug:
    """Refuse debug-mode enclaves (PCR0, PCR1 and PCR2 all zero): their image is not measured."""

    def failures(self, verified: VerifiedAttestation) -> tuple[Failure, ...]:
        if verified.is_debug:
            return (
                Failure(
                    "debug mode",
                    "a production enclave (PCR0-2 measured)",
                    "a debug-mode enclave (PCR0, PCR1, PCR2 all zero); allow only for development",
                ),
            )
        return ()


@dataclass(frozen=True, slots=True)
class AllOf:
    """Every child policy holds; reports the failures of all of them."""

    policies: tuple[Policy, ...]

    def __init__(self, policies: Iterable[Policy]) -> None:
        items = tuple(policies)
        if not items:
            raise ValueError("AllOf([]) would accept anything; give at least one policy")
        object.__setattr__(self, "policies", items)

    def failures(self, verified: VerifiedAttestation) -> tuple[Failure, ...]:
        return tuple(f for p in self.policies for f in p.failures(verified))


@dataclass(frozen=True, slots=True)
class AnyOf:
    """At least one child policy holds; otherwise reports every branch's failures."""

    policies: tuple[Policy, ...]

    def __init__(self, policies: Iterable[Policy]) -> None:
        items = tuple(policies)
        if not items:
            raise ValueError("AnyOf([]) can never be satisfied; give at least one policy")
        object.__setattr__(self, "policies", items)

    def failures(self, verified: VerifiedAttestation) -> tuple[Failure, ...]:
        collected: list[Failure] = []
        for number, child in enumerate(self.policies, 1):
            branch = child.failures(verified)
            if not branch:
                return ()
            collected += [
                Failure(f"branch {number}/{len(self.policies)}: {f.check}", f.expected, f.found)
                for f in branch
            ]
        return tuple(collected)


@dataclass(frozen=True, slots=True)
class UnsafeNoOp:
    """Accepts every verified document, debug ones included. Logs a warning on every use."""

    def failures(self, verified: VerifiedAttestation) -> tuple[Failure, ...]:
        logger.warning(
            "UnsafeNoOp policy: accepting %s without any policy check", verified.module_id
        )
        return ()


# -- files -----------------------------------------------------------------------------------------

_FILE_KEYS = frozenset(
    {
        "pcrs",
        "allowlist",
        "nitrotpm_pcrs",
        "nonce",
        "public_key",
        "user_data",
        "max_age",
        "allow_debug",
    }
)
#: ``0``..``31``, optionally prefixed ``PCR`` (any case): ASCII digits only (``str.isdigit`` accepts "²").
_PCR_INDEX = re.compile(r"(?:[Pp][Cc][Rr])?([0-9]{1,2})")


def parse_pcr_value(value: object, where: str) -> bytes:
    """A PCR value given as hex text; must decode to 32, 48 or 64 bytes."""
    if not isinstance(value, str):
        raise UsageError(f"{where}: expected a hex string, found {type(value).__name__}")
    try:
        raw = bytes.fromhex(value.strip())
    except ValueError:
        raise UsageError(f"{where}: {value[:20]!r}… is not hex") from None
    if len(raw) not in PCR_LENGTHS:
        raise UsageError(f"{where}: {len(raw)} bytes; a PCR is 32, 48 or 64 bytes")
    return raw


def parse_pcr_index(key: object, where: str) -> int:
    """``0``, ``"0"`` or ``"PCR0"`` → 0 (0..31). Text must be ASCII digits (after an optional ``PCR``)."""
    if type(key) is int:
        text = str(key)
    elif type(key) is str:
        text = key
    else:
        raise UsageError(f"{where}: {key!r} is not a PCR index (0..31 or PCR0..PCR31)")
    match = _PCR_INDEX.fullmatch(text)
    if match is None or not 0 <= int(match.group(1)) < 32:
        raise UsageError(f"{where}: {key!r} is not a PCR index (0..31 or PCR0..PCR31)")
    return int(match.group(1))


def _pcr_map(obj: object, where: str) -> dict[int, bytes]:
    if isinstance(obj, Mapping) and "Measurements" in obj:
        return _measurements(obj, where)
    if not isinstance(obj, Mapping) or not obj:
        raise UsageError(f"{where}: expected a non-empty map of PCR index → hex value")
    return {parse_pcr_index(k, where): parse_pcr_value(v, f"{where}.{k}") for k, v in obj.items()}


def _measurements(obj: Mapping[str, Any], where: str) -> dict[int, bytes]:
    """nitro-cli's build-enclave / describe-eif JSON: take every PCRn of ``Measurements``."""
    measurements = obj["Measurements"]
    if not isinstance(measurements, Mapping):
        raise UsageError(f"{where}: 'Measurements' must be a map")
    algorithm = str(measurements.get("HashAlgorithm", "Sha384"))
    # nitro-cli prints the Debug form of its hasher: "Sha384 { ... }" or, in 1.5, "Sha512_384 { .. }".
    if not algorithm.lower().startswith(("sha384", "sha512_384")):
        raise UsageError(f"{where}: HashAlgorithm {algorithm!r}; expected Sha384")
    pcrs = {
        parse_pcr_index(k, where): parse_pcr_value(v, f"{where}.Measurements.{k}")
        for k, v in measurements.items()
        if str(k).upper().startswith("PCR")
    }
    if not pcrs:
        raise UsageError(f"{where}: 'Measurements' holds no PCR values")
    return pcrs


def _hex_bytes(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise UsageError(f"{where}: expected a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise UsageError(f"{where}: not hex") from None


def policy_from_mapping(obj: object, *, source: str = "policy") -> Policy:
    """Build a policy from a decoded JSON/YAML object.

    Accepted shapes:

    - nitro-cli output ``{"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": …, …}}`` (other
      top-level keys of describe-eif, such as ``EifVersion``, are ignored): those PCRs must match;
    - a list of such objects: an allowlist (any one matches);
    - enclavekit's own map, every key optional but at least one check required::

        pcrs: {0: hex, 1: hex, 2: hex}        # or "PCR0": hex, or a nitro-cli object
        allowlist: [{0: hex, ...}, {...}]     # any one set matches
        nitrotpm_pcrs: {8: hex}               # NitroTPM PCRs (documents verified with allow_nitrotpm)
        nonce: hex
        public_key: hex
        user_data: hex
        max_age: 300                          # seconds
        allow_debug: false                    # debug-mode enclaves are refused unless true

    Unknown keys in enclavekit's format are refused (a typo must not weaken a policy). Debug-mode documents
    are refused unless ``allow_debug: true``. ``pcrs``/``allowlist``/nitro-cli measurements are enclave PCRs,
    never satisfied by a NitroTPM document; ``nitrotpm_pcrs`` are NitroTPM PCRs, never satisfied by an
    enclave document, so a file may not hold both.
    """
    if isinstance(obj, list):
        return AllOf(
            [NotDebug(), PcrAllowlist([_pcr_map(o, f"{source}[{i}]") for i, o in enumerate(obj)])]
        )
    if not isinstance(obj, Mapping):
        raise UsageError(f"{source}: expected a map (or a list of nitro-cli measurement objects)")
    if "Measurements" in obj:
        return AllOf([NotDebug(), PcrsEqual(_measurements(obj, source))])
    unknown = set(obj) - _FILE_KEYS
    if unknown:
        raise UsageError(
            f"{source}: unknown key(s) {sorted(map(str, unknown))}; expected some of {sorted(_FILE_KEYS)}"
        )
    parts: list[Policy] = []
    allow_debug = obj.get("allow_debug", False)
    if isinstance(allow_debug, str) and allow_debug.lower() in ("true", "false"):
        allow_debug = allow_debug.lower() == "true"  # from YAML, where scalars stay strings
    if not isinstance(allow_debug, bool):
        raise UsageError(f"{source}.allow_debug: expected true or false")
    if "pcrs" in obj:
        parts.append(PcrsEqual(_pcr_map(obj["pcrs"], f"{source}.pcrs")))
    if "allowlist" in obj:
        entries = obj["allowlist"]
        if not isinstance(entries, list) or not entries:
            raise UsageError(f"{source}.allowlist: expected a non-empty list of PCR maps")
        parts.append(
            PcrAllowlist([_pcr_map(e, f"{source}.allowlist[{i}]") for i, e in enumerate(entries)])
        )
    if "nitrotpm_pcrs" in obj:
        if "pcrs" in obj or "allowlist" in obj:
            raise UsageError(
                f"{source}: nitrotpm_pcrs (NitroTPM PCRs) cannot be combined with pcrs/allowlist "
                "(enclave PCRs): no document carries both, so the policy could never be satisfied"
            )
        parts.append(NitroTpmPcrsEqual(_pcr_map(obj["nitrotpm_pcrs"], f"{source}.nitrotpm_pcrs")))
    if "nonce" in obj:
        parts.append(NonceEquals(_hex_bytes(obj["nonce"], f"{source}.nonce")))
    if "public_key" in obj:
        parts.append(PublicKeyEquals(_hex_bytes(obj["public_key"], f"{source}.public_key")))
    if "user_data" in obj:
        parts.append(UserDataEquals(_hex_bytes(obj["user_data"], f"{source}.user_data")))
    if "max_age" in obj:
        age = obj["max_age"]
        if isinstance(age, str):
            try:
                age = float(age)
            except ValueError:
                raise UsageError(f"{source}.max_age: expected a number of seconds") from None
        if not isinstance(age, int | float) or isinstance(age, bool) or age <= 0:
            raise UsageError(f"{source}.max_age: expected a positive number of seconds")
        parts.append(MaxAge(timedelta(seconds=age)))
    if not parts:
        raise UsageError(f"{source}: the policy sets no check; it would accept any enclave")
    if not allow_debug:
        parts.insert(0, NotDebug())
    return AllOf(parts)


def load_policy(path: str | Path) -> Policy:
    """Read a policy file (JSON or YAML; see :func:`policy_from_mapping`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read policy file {str(path)!r}: {exc}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        try:
            # BaseLoader keeps every scalar a string: hex such as 7564 or 000…0 must not become a number.
            obj = yaml.load(text, Loader=yaml.BaseLoader)  # noqa: S506 - BaseLoader builds no objects
        except yaml.YAMLError as exc:
            raise UsageError(f"policy file {str(path)!r} is neither JSON nor YAML: {exc}") from None
    return policy_from_mapping(obj, source=str(path))


def combine(policies: Sequence[Policy]) -> Policy:
    """One policy from several (an AllOf, or the single policy itself)."""
    if len(policies) == 1:
        return policies[0]
    return AllOf(policies)

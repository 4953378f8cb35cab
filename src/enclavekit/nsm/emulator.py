"""The NSM state machine, emulated: PCRs, locks, randomness and signed attestation documents.

Behaviour follows the NSM as observed by AWS's conformance test, QEMU's device model and the
mainline driver (``nsm.md`` §4):

- 32 PCRs of 48 bytes; PCR0-15 are set at start (from an EIF's measurements or given values) and
  locked, PCR16-31 start at zero, unlocked;
- DescribePCR/ExtendPCR/LockPCR: index ≥ 32 → ``InvalidIndex``; ExtendPCR or LockPCR on a locked PCR
  → ``ReadOnlyIndex``; ExtendPCR sets ``pcr = SHA-384(pcr ‖ data)`` and answers with the new value;
- LockPCRs{range}: range > 32 → ``InvalidIndex``; locks ``[0, range)``, already locked PCRs are
  fine;
- Attestation: a COSE_Sign1 document over all *locked* PCRs, signed by :class:`EmulatedAwsPki`'s
  rotating leaf;
- GetRandom: 256 bytes from the OS CSPRNG; unknown or malformed request → ``InvalidOperation``;
  request larger than 4096 bytes → ``InputTooLarge``. That is the NSM's only limit on user_data, nonce
  and public_key: an Attestation request (as serde encodes it) of at most 4096 bytes is answered,
  a larger one refused, whether it arrives as bytes, as a decoded request or through :meth:`attest`.

``nitrotpm=True`` makes a NitroTPM-shaped module instead (an EC2 instance's TPM, for tests of verifiers
that must refuse it): module id ``i-<17 hex>-tpm<16 hex>``, documents carry ``nitrotpm_pcrs`` with all 24
PCRs of the TPM's SHA-384 bank whatever their lock state, and PCR8-23 stay unlocked, so ExtendPCR can set
them as an instance's operating system does. Only the document shape is NitroTPM's: the request path is
still the NSM's, not the TPM vendor command.

Debug mode (``nitro-cli run-enclave --debug-mode``) zeroes PCR0, 1, 2 and 8, like AWS; PCR3 and PCR4
stay set. PCR4 defaults to SHA-384(48 zero bytes ‖ instance id), the value AWS puts there; PCR3 (IAM
role) to zero.

What is *not* emulated: the 120 s driver timeout, the NitroTPM's TPM interface, AWS's exact (unpublished) version
numbers (1.0.0 is reported, as QEMU does) and any limit on the three attestation inputs other than
the 4096-byte request size.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from enclavekit.errors import MalformedInput, NsmError
from enclavekit.nsm import _document
from enclavekit.nsm.messages import (
    MAX_PCRS,
    MAX_REQUEST_SIZE,
    PCR_LENGTH,
    RANDOM_LENGTH,
    Attestation,
    AttestationDocument,
    DescribeNsm,
    DescribePcr,
    ErrorCode,
    ErrorResponse,
    ExtendPcr,
    GetRandom,
    LockPcr,
    LockPcrs,
    NsmDescription,
    PcrDescription,
    PcrExtended,
    PcrLocked,
    PcrsLocked,
    RandomBytes,
    Request,
    Response,
    UnknownRequest,
    decode_request,
    encode_request,
    encode_response,
)
from enclavekit.pki.emulated import Clock, EmulatedAwsPki, utc_now

#: PCRs the NSM locks at boot.
BOOT_LOCKED_PCRS = range(16)
#: PCRs that are zero in a debug-mode enclave (image, kernel+bootstrap, application, signing
#: certificate).
DEBUG_ZEROED_PCRS = (0, 1, 2, 8)
VERSION = (1, 0, 0)
_ZERO = bytes(PCR_LENGTH)
_MODULE_ID = re.compile(r"(i-[0-9a-f]{17})-(enc|tpm)([0-9a-f]{16})")
#: A NitroTPM's SHA-384 bank has 24 PCRs; PCR0-7 are the firmware's and boot loader's.
NITROTPM_PCRS = 24
NITROTPM_LOCKED_PCRS = range(8)


def instance_pcr4(instance_id: str) -> bytes:
    """PCR4 as AWS sets it: SHA-384(48 zero bytes ‖ UTF-8 instance id)."""
    return hashlib.sha384(_ZERO + instance_id.encode()).digest()


def new_module_id(now: datetime, instance_id: str | None = None, *, nitrotpm: bool = False) -> str:
    """A module id shaped like AWS's: ``i-<17 hex>-enc<16 hex>`` (``-tpm`` for a NitroTPM), the enclave
    id starting with the launch ms.
    """
    instance = instance_id or "i-0" + secrets.token_hex(8)
    enclave_id = (_document.timestamp_ms(now) & 0xFFFF_FFFF_FFFF) << 16 | secrets.randbits(16)
    return f"{instance}-{'tpm' if nitrotpm else 'enc'}{enclave_id:016x}"


def attestation_request_size(
    user_data: bytes | None, nonce: bytes | None, public_key: bytes | None
) -> int:
    """The size of the Attestation request the NSM client library (serde) sends for these fields."""
    return len(encode_request(Attestation(user_data, nonce, public_key)))


class NsmEmulator:
    """An emulated NSM; thread-safe. Talk to it through :meth:`Nsm.in_process
    <enclavekit.nsm.Nsm.in_process>` or serve it with :mod:`enclavekit.nsm.server`.

    ``pcrs``: initial values of PCR0-15 (48 bytes each; missing ones are zero, PCR4 defaults to the
    instance value). ``debug_mode`` zeroes PCR0/1/2/8. ``module_id`` must look like AWS's (``i-<17
    hex>-enc<16 hex>``), default random. ``pki`` signs the documents (default: an ephemeral one;
    pass ``EmulatedAwsPki.load_or_create(state_dir)`` for a root that verifiers can pin). ``clock``
    gives document time; ``definite_payload`` emits the pre-2025 definite-length top-level map
    instead of AWS's current indefinite one.
    """

    def __init__(
        self,
        *,
        pcrs: Mapping[int, bytes] | None = None,
        debug_mode: bool = False,
        pki: EmulatedAwsPki | None = None,
        module_id: str | None = None,
        clock: Clock = utc_now,
        definite_payload: bool = False,
        random_bytes: Callable[[int], bytes] = os.urandom,
        nitrotpm: bool = False,
    ) -> None:
        if nitrotpm and debug_mode:
            raise ValueError("a NitroTPM has no debug mode")
        self._clock = clock
        self.nitrotpm = nitrotpm
        self.pki = pki if pki is not None else EmulatedAwsPki.ephemeral(clock=clock)
        self.module_id = module_id or new_module_id(clock(), nitrotpm=nitrotpm)
        match = _MODULE_ID.fullmatch(self.module_id)
        kind = "tpm" if nitrotpm else "enc"
        if match is None or match.group(2) != kind:
            raise ValueError(
                f"module_id must look like AWS's 'i-<17 hex>-{kind}<16 hex>', got {self.module_id!r}"
            )
        self.instance_id = match.group(1)
        self.enclave_id = int(match.group(3), 16)
        self.debug_mode = debug_mode
        self.definite_payload = definite_payload
        self._random_bytes = random_bytes
        values = [_ZERO] * MAX_PCRS
        values[4] = instance_pcr4(self.instance_id)
        for index, value in (pcrs or {}).items():
            if index not in BOOT_LOCKED_PCRS:
                raise ValueError(f"only PCR0-15 can be set at start, got PCR{index}")
            if len(value) != PCR_LENGTH:
                raise ValueError(f"PCR{index} must be {PCR_LENGTH} bytes, got {len(value)}")
            values[index] = bytes(value)
        if debug_mode:
            for index in DEBUG_ZEROED_PCRS:
                values[index] = _ZERO
        self._pcrs = values
        boot_locked = NITROTPM_LOCKED_PCRS if nitrotpm else BOOT_LOCKED_PCRS
        self._locked = [i in boot_locked for i in range(MAX_PCRS)]
        self._state = threading.Lock()
        self._encoded_module_id = _document.encode_module_id(self.module_id)
        self._encoded_pcrs: bytes | None = None  # cache: locked PCRs never change

    @classmethod
    def from_eif(
        cls,
        eif_path: str | os.PathLike[str],
        *,
        pcrs: Mapping[int, bytes] | None = None,
        **kwargs: Any,
    ) -> NsmEmulator:
        """An emulator whose PCR0/1/2 (and 8 for a signed image) are the EIF's measurements.

        The EIF gets a full integrity check first (:func:`enclavekit.eif.reader.measure_eif`).
        ``pcrs`` adds or overrides values (e.g. PCR3); other keyword arguments go to the constructor.
        """
        from enclavekit.eif.reader import measure_eif

        values = dict(measure_eif(eif_path).pcrs)
        values.update(pcrs or {})
        return cls(pcrs=values, **kwargs)

    # -- raw bytes -----------------------------------------------------------------------------

    def handle_bytes(self, raw: bytes) -> bytes:
        """Answer one CBOR request with one CBOR response, as the device does (never raises for bad
        input).
        """
        if len(raw) > MAX_REQUEST_SIZE:
            return encode_response(ErrorResponse(ErrorCode.INPUT_TOO_LARGE))
        try:
            request = decode_request(raw)
        except MalformedInput:
            return encode_response(ErrorResponse(ErrorCode.INVALID_OPERATION))
        return encode_response(self.handle(request))

    # -- requests ------------------------------------------------------------------------------

    def handle(self, request: Request | UnknownRequest) -> Response:
        """Answer one decoded request."""
        match request:
            case DescribePcr(index):
                if index >= MAX_PCRS:
                    return ErrorResponse(ErrorCode.INVALID_INDEX)
                with self._state:
                    return PcrDescription(self._locked[index], self._pcrs[index])
            case ExtendPcr(index, data):
                if index >= MAX_PCRS:
                    return ErrorResponse(ErrorCode.INVALID_INDEX)
                with self._state:
                    if self._locked[index]:
                        return ErrorResponse(ErrorCode.READ_ONLY_INDEX)
                    value = hashlib.sha384(self._pcrs[index] + data).digest()
                    self._pcrs[index] = value
                    return PcrExtended(value)
            case LockPcr(index):
                if index >= MAX_PCRS:
                    return ErrorResponse(ErrorCode.INVALID_INDEX)
                with self._state:
                    if self._locked[index]:
                        return ErrorResponse(ErrorCode.READ_ONLY_INDEX)
                    self._locked[index] = True
                    self._encoded_pcrs = None
                    return PcrLocked()
            case LockPcrs(range_):
                if range_ > MAX_PCRS:
                    return ErrorResponse(ErrorCode.INVALID_INDEX)
                with self._state:
                    for index in range(range_):
                        self._locked[index] = True
                    self._encoded_pcrs = None
                    return PcrsLocked()
            case DescribeNsm():
                with self._state:
                    locked = tuple(i for i in range(MAX_PCRS) if self._locked[i])
                return NsmDescription(
                    *VERSION,
                    module_id=self.module_id,
                    max_pcrs=MAX_PCRS,
                    locked_pcrs=locked,
                    digest="SHA384",
                )
            case Attestation(user_data, nonce, public_key):
                try:
                    return AttestationDocument(self.attest(user_data, nonce, public_key))
                except NsmError:  # the only refusal of attest(): InputTooLarge
                    return ErrorResponse(ErrorCode.INPUT_TOO_LARGE)
            case GetRandom():
                return RandomBytes(self._random_bytes(RANDOM_LENGTH))
        return ErrorResponse(ErrorCode.INVALID_OPERATION)

    def attest(
        self,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
        *,
        now: datetime | None = None,
    ) -> bytes:
        """A signed attestation document at ``now`` (default: the clock) over the currently locked
        PCRs (a NitroTPM: over all 24).

        Raises :class:`NsmError` ``InputTooLarge`` when the fields do not fit in one NSM request, as the
        NSM refuses them.
        """
        size = attestation_request_size(user_data, nonce, public_key)
        if size > MAX_REQUEST_SIZE:
            raise NsmError(
                ErrorCode.INPUT_TOO_LARGE.value,
                f"NSM InputTooLarge: user_data, nonce and public_key make a {size}-byte Attestation "
                f"request; the NSM accepts at most {MAX_REQUEST_SIZE}",
            )
        moment = now or self._clock()
        with self._state:
            encoded_pcrs = self._encoded_pcrs
            if self.nitrotpm:  # the whole bank, changing with every extend: not cached
                encoded_pcrs = _document.encode_pcrs(
                    {i: self._pcrs[i] for i in range(NITROTPM_PCRS)}, key="nitrotpm_pcrs"
                )
            elif encoded_pcrs is None:
                locked = {i: self._pcrs[i] for i in range(MAX_PCRS) if self._locked[i]}
                encoded_pcrs = self._encoded_pcrs = _document.encode_pcrs(locked)
        credentials = self.pki.credentials(
            module_id=self.module_id,
            instance_id=self.instance_id,
            enclave_id=self.enclave_id,
            now=moment,
        )
        payload = _document.encode_payload(
            encoded_module_id=self._encoded_module_id,
            timestamp=_document.timestamp_ms(moment),
            encoded_pcrs=encoded_pcrs,
            credentials=credentials,
            public_key=public_key,
            user_data=user_data,
            nonce=nonce,
            indefinite=not self.definite_payload,
        )
        return _document.sign_document(payload, credentials.key)

    # -- helpers -------------------------------------------------------------------------------

    def pcr(self, index: int) -> tuple[bool, bytes]:
        """(locked, value) of one PCR, for inspection in tests and the CLI."""
        with self._state:
            return self._locked[index], self._pcrs[index]

"""A local stand-in for the AWS KMS endpoint, for tests and the demo. **Not a KMS**: keys live in memory.

It speaks the KMS JSON 1.1 protocol over HTTP for ``Encrypt``, ``Decrypt``, ``GenerateDataKey`` and
``GenerateRandom``, and behaves like KMS where enclaves care:

1. the SigV4 signature is recomputed with botocore for the one configured credential
   (``UnrecognizedClientException`` / ``InvalidSignatureException`` otherwise);
2. a ``Recipient`` must name ``RSAES_OAEP_SHA_256`` and carry an attestation document that the injected
   :class:`~enclavekit.attestation.verifier.Verifier` accepts at the injected time, with an RSA-2048
   SubjectPublicKeyInfo in ``public_key`` (``ValidationException`` otherwise);
3. the key policy is evaluated: ``Allow``/``Deny`` statements with ``Action`` (``kms:Decrypt``,
   ``kms:*`` ...) and ``Condition`` operators ``StringEquals`` / ``StringEqualsIgnoreCase`` over
   ``kms:RecipientAttestation:ImageSha384`` (= PCR0) and ``kms:RecipientAttestation:PCR<n>`` (lower-case
   hex) for an enclave document, ``kms:RecipientAttestation:NitroTPMPCR<n>`` for a NitroTPM document (KMS
   accepts both kinds; a NitroTPM document never provides the enclave keys, so no enclave condition is
   satisfied by it); a condition on a key the request lacks (no Recipient) fails; an explicit Deny wins; no
   matching Allow → ``AccessDeniedException``;
4. with a Recipient the answer has ``CiphertextForRecipient`` (a real BER CMS envelope to the document's
   key) and no ``Plaintext``.

Not emulated: principals, grants, aliases, IAM policies, other condition operators/keys, key rotation,
quotas. Ciphertext blobs use an enclavekit-private format (AES-256-GCM, encryption context as AAD).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import ssl
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclavekit.attestation.document import DocumentKind
from enclavekit.attestation.verifier import VerifiedAttestation, Verifier
from enclavekit.errors import Error
from enclavekit.kms._sigv4 import check_signature
from enclavekit.kms.client import AwsCredentials
from enclavekit.kms.envelope import encode_envelope
from enclavekit.kms.recipient import KEY_ENCRYPTION_ALGORITHM, RSA_KEY_BITS
from enclavekit.transport.address import TcpAddress

ACCOUNT = "111122223333"
MAX_REQUEST_BYTES = 512 * 1024
_BLOB_VERSION = b"\x01"
_CONDITION_PREFIX = "kms:RecipientAttestation:"
_OPERATORS = ("StringEquals", "StringEqualsIgnoreCase")


class KmsFault(Exception):
    """A KMS error answer: ``code`` is the ``__type``, ``status`` the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class Condition:
    operator: str
    key: str
    values: tuple[str, ...]

    def holds(self, context: Mapping[str, str]) -> bool:
        found = context.get(self.key)
        if found is None:
            return False
        if self.operator == "StringEqualsIgnoreCase":
            return found.lower() in {v.lower() for v in self.values}
        return found in self.values


@dataclass(frozen=True, slots=True)
class Statement:
    effect: str
    actions: tuple[str, ...]
    conditions: tuple[Condition, ...]

    def applies(self, action: str, context: Mapping[str, str]) -> bool:
        if not any(a in ("kms:*", "*", action) for a in self.actions):
            return False
        return all(c.holds(context) for c in self.conditions)


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """The subset of a KMS key policy the stand-in evaluates (see the module docstring)."""

    statements: tuple[Statement, ...]

    @classmethod
    def allow_all(cls) -> KeyPolicy:
        return cls((Statement("Allow", ("kms:*",), ()),))

    @classmethod
    def from_mapping(cls, obj: Mapping[str, Any]) -> KeyPolicy:
        raw = obj.get("Statement")
        if isinstance(raw, Mapping):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise ValueError("key policy needs a non-empty Statement list")
        statements = []
        for item in raw:
            effect = item.get("Effect")
            if effect not in ("Allow", "Deny"):
                raise ValueError(f"Effect must be Allow or Deny, got {effect!r}")
            actions = item.get("Action", [])
            actions = [actions] if isinstance(actions, str) else list(actions)
            conditions = []
            for operator, body in dict(item.get("Condition", {})).items():
                if operator not in _OPERATORS:
                    raise ValueError(f"unsupported condition operator {operator!r}")
                for key, values in dict(body).items():
                    values = [values] if isinstance(values, str) else list(values)
                    conditions.append(Condition(operator, str(key), tuple(map(str, values))))
            statements.append(Statement(effect, tuple(map(str, actions)), tuple(conditions)))
        return cls(tuple(statements))

    def decide(self, action: str, context: Mapping[str, str]) -> None:
        """Raise :class:`KmsFault` unless an Allow applies and no Deny does."""
        matching = [s for s in self.statements if s.applies(action, context)]
        if any(s.effect == "Deny" for s in matching):
            raise KmsFault(
                "AccessDeniedException", f"{action} is explicitly denied by the key policy"
            )
        if not matching:
            raise KmsFault(
                "AccessDeniedException",
                f"no key policy statement allows {action} for this request"
                + ("" if context else " (no Recipient attestation was supplied)"),
            )


def attestation_context(verified: VerifiedAttestation) -> dict[str, str]:
    """KMS condition keys for a verified document (lower-case hex, as KMS documents them).

    A NitroTPM document yields only ``NitroTPMPCR<n>`` keys, an enclave document only ``PCR<n>`` and
    ``ImageSha384``: a TPM's PCR8 never satisfies a condition on an enclave's PCR8."""
    if verified.kind is DocumentKind.NITROTPM or verified.is_nitrotpm:
        return {
            f"{_CONDITION_PREFIX}NitroTPMPCR{i}": value.hex()
            for i, value in verified.nitrotpm_pcrs.items()
        }
    context = {f"{_CONDITION_PREFIX}PCR{i}": value.hex() for i, value in verified.pcrs.items()}
    if 0 in verified.pcrs:
        context[f"{_CONDITION_PREFIX}ImageSha384"] = verified.pcrs[0].hex()
    return context


@dataclass
class _Key:
    key_id: str
    material: bytes
    policy: KeyPolicy


class StandInKms:
    """The request logic (:meth:`handle`) plus an HTTP front end (:meth:`serve`)."""

    def __init__(
        self,
        *,
        verifier: Verifier,
        credentials: AwsCredentials,
        region: str = "eu-west-1",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.verifier = verifier
        self.credentials = credentials
        self.region = region
        self._clock = clock
        self._random = random
        self._keys: dict[str, _Key] = {}
        self._lock = threading.Lock()

    # -- administration (not part of the KMS API here) -------------------------------------------
    def create_key(self, policy: KeyPolicy | Mapping[str, Any] | None = None) -> str:
        """Create a symmetric key; return its ARN."""
        if policy is None:
            policy = KeyPolicy.allow_all()
        elif not isinstance(policy, KeyPolicy):
            policy = KeyPolicy.from_mapping(policy)
        key = _Key(str(uuid.UUID(bytes=self._random(16), version=4)), self._random(32), policy)
        with self._lock:
            self._keys[key.key_id] = key
        return self._arn(key)

    def _arn(self, key: _Key) -> str:
        return f"arn:aws:kms:{self.region}:{ACCOUNT}:key/{key.key_id}"

    def _key(self, key_id: str) -> _Key:
        bare = key_id.rsplit("/", 1)[-1] if key_id.startswith("arn:") else key_id
        with self._lock:
            key = self._keys.get(bare)
        if key is None:
            raise KmsFault("NotFoundException", f"key {key_id} does not exist")
        return key

    # -- operations ---------------------------------------------------------------------------
    def handle(self, operation: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Run one KMS operation on a decoded JSON body; raise :class:`KmsFault` on refusal."""
        handlers = {
            "Encrypt": self._encrypt,
            "Decrypt": self._decrypt,
            "GenerateDataKey": self._generate_data_key,
            "GenerateRandom": self._generate_random,
        }
        handler = handlers.get(operation)
        if handler is None:
            raise KmsFault("UnknownOperationException", f"operation {operation!r} not supported")
        return handler(body)

    def _recipient(self, body: Mapping[str, Any]) -> tuple[rsa.RSAPublicKey | None, dict[str, str]]:
        recipient = body.get("Recipient")
        if recipient is None:
            return None, {}
        if not isinstance(recipient, Mapping):
            raise KmsFault("ValidationException", "Recipient must be an object")
        algorithm = recipient.get("KeyEncryptionAlgorithm")
        if algorithm != KEY_ENCRYPTION_ALGORITHM:
            raise KmsFault(
                "ValidationException",
                f"KeyEncryptionAlgorithm must be {KEY_ENCRYPTION_ALGORITHM}, got {algorithm!r}",
            )
        document = _b64field(recipient, "AttestationDocument")
        try:
            # KMS accepts NitroTPM documents too; their PCRs become NitroTPMPCR<n> keys only.
            verified = self.verifier.verify_signature_and_chain(
                document, at=self._clock(), allow_nitrotpm=True
            )
        except Error as exc:
            raise KmsFault(
                "ValidationException",
                f"the Recipient attestation document is not valid: {exc.diagnostics()}",
            ) from None
        if verified.public_key is None:
            raise KmsFault("ValidationException", "the attestation document has no public_key")
        try:
            key = serialization.load_der_public_key(verified.public_key)
        except ValueError:
            key = None
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size != RSA_KEY_BITS:
            raise KmsFault(
                "ValidationException",
                f"the attestation document's public_key must be an RSA-{RSA_KEY_BITS} SPKI",
            )
        return key, attestation_context(verified)

    def _answer(
        self, plaintext: bytes, recipient: rsa.RSAPublicKey | None, extra: dict[str, Any]
    ) -> dict[str, Any]:
        if recipient is None:
            return {**extra, "Plaintext": _b64(plaintext)}
        envelope = encode_envelope(plaintext, recipient, random=self._random)
        return {**extra, "CiphertextForRecipient": _b64(envelope)}

    def encrypt(
        self, key_id: str, plaintext: bytes, encryption_context: Mapping[str, str] | None = None
    ) -> bytes:
        """A ciphertext blob for ``plaintext`` under ``key_id`` (what ``Encrypt`` returns)."""
        key = self._key(key_id)
        nonce = self._random(12)
        sealed = AESGCM(key.material).encrypt(nonce, plaintext, _aad(encryption_context))
        return _BLOB_VERSION + key.key_id.encode() + nonce + sealed

    def _open(self, blob: bytes) -> _Key:
        if len(blob) < 1 + 36 + 12 + 16 or blob[:1] != _BLOB_VERSION:
            raise KmsFault("InvalidCiphertextException", "ciphertext blob is not from this KMS")
        return self._key(blob[1:37].decode("ascii", "replace"))

    def _encrypt(self, body: Mapping[str, Any]) -> dict[str, Any]:
        key = self._key(_str(body, "KeyId"))
        key.policy.decide("kms:Encrypt", {})
        context = body.get("EncryptionContext")
        blob = self.encrypt(key.key_id, _b64field(body, "Plaintext"), context)
        return {"CiphertextBlob": _b64(blob), "KeyId": self._arn(key)}

    def _decrypt(self, body: Mapping[str, Any]) -> dict[str, Any]:
        blob = _b64field(body, "CiphertextBlob")
        context = body.get("EncryptionContext")
        key = self._open(blob)
        if "KeyId" in body and self._key(_str(body, "KeyId")).key_id != key.key_id:
            raise KmsFault("IncorrectKeyException", "the ciphertext was not made with KeyId")
        recipient, conditions = self._recipient(body)
        key.policy.decide("kms:Decrypt", conditions)
        try:
            plaintext = AESGCM(key.material).decrypt(blob[37:49], blob[49:], _aad(context))
        except Exception:  # cryptography's InvalidTag
            raise KmsFault(
                "InvalidCiphertextException", "ciphertext or encryption context is wrong"
            ) from None
        return self._answer(plaintext, recipient, {"KeyId": self._arn(key)})

    def _generate_data_key(self, body: Mapping[str, Any]) -> dict[str, Any]:
        key = self._key(_str(body, "KeyId"))
        spec = body.get("KeySpec")
        size = body.get("NumberOfBytes")
        if spec is not None and size is not None:
            raise KmsFault("ValidationException", "give KeySpec or NumberOfBytes, not both")
        if size is None:
            size = {"AES_256": 32, "AES_128": 16}.get(str(spec or "AES_256"))
        if not isinstance(size, int) or not 1 <= size <= 1024:
            raise KmsFault("ValidationException", f"bad KeySpec/NumberOfBytes {spec!r}/{size!r}")
        recipient, conditions = self._recipient(body)
        key.policy.decide("kms:GenerateDataKey", conditions)
        data_key = self._random(size)
        blob = self.encrypt(key.key_id, data_key, body.get("EncryptionContext"))
        return self._answer(
            data_key, recipient, {"KeyId": self._arn(key), "CiphertextBlob": _b64(blob)}
        )

    def _generate_random(self, body: Mapping[str, Any]) -> dict[str, Any]:
        size = body.get("NumberOfBytes")
        if not isinstance(size, int) or not 1 <= size <= 1024:
            raise KmsFault("ValidationException", "NumberOfBytes must be 1..1024")
        recipient, _ = self._recipient(body)
        return self._answer(self._random(size), recipient, {})

    # -- HTTP ------------------------------------------------------------------------------------
    def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, tls: ssl.SSLContext | None = None
    ) -> StandInServer:
        """Serve on a background thread: plain HTTP, or HTTPS with a server-side ``tls`` context."""
        return StandInServer(self, host, port, tls)


class StandInServer:
    """A running HTTP front end; ``address`` is where it listens. Use as a context manager."""

    def __init__(
        self, kms: StandInKms, host: str, port: int, tls: ssl.SSLContext | None = None
    ) -> None:
        handler = type("_BoundHandler", (_Handler,), {"kms": kms})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.tls = tls is not None
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        bound = self._server.server_address
        self.address = TcpAddress(str(bound[0]), int(bound[1]))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.address.host}:{self.address.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> StandInServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    kms: StandInKms
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_REQUEST_BYTES:
            self._reply(400, {"__type": "ValidationException", "message": "bad Content-Length"})
            return
        body = self.rfile.read(length)
        try:
            answer = self._dispatch(body)
        except KmsFault as fault:
            self._reply(fault.status, {"__type": fault.code, "message": fault.message})
            return
        self._reply(200, answer)

    def _dispatch(self, body: bytes) -> dict[str, Any]:
        kms = self.kms
        headers = dict(self.headers.items())
        host = self.headers.get("Host", "")
        authorization = self.headers.get("Authorization", "")
        if f"Credential={kms.credentials.access_key_id}/" not in authorization:
            raise KmsFault("UnrecognizedClientException", "the security token is invalid")
        ok = check_signature(
            method="POST",
            url=f"http://{host}/",
            headers=headers,
            body=body,
            secret_key=kms.credentials.secret_access_key,
            region=kms.region,
            service="kms",
        )
        if not ok:
            raise KmsFault("InvalidSignatureException", "the request signature does not match")
        target = self.headers.get("X-Amz-Target", "")
        if not target.startswith("TrentService."):
            raise KmsFault("UnknownOperationException", f"bad X-Amz-Target {target!r}")
        try:
            decoded = json.loads(body)
        except ValueError:
            raise KmsFault("SerializationException", "body is not JSON") from None
        if not isinstance(decoded, dict):
            raise KmsFault("SerializationException", "body is not a JSON object")
        return kms.handle(target.split(".", 1)[1], decoded)

    def _reply(self, status: int, answer: Mapping[str, Any]) -> None:
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _str(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise KmsFault("ValidationException", f"{name} must be a non-empty string")
    return value


def _b64field(body: Mapping[str, Any], name: str) -> bytes:
    value = _str(body, name)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KmsFault("ValidationException", f"{name} is not valid base64") from None


def _aad(context: Mapping[str, str] | None) -> bytes | None:
    if not context:
        return None
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode()

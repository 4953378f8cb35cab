"""A small KMS client for enclaves: Decrypt, GenerateDataKey and GenerateRandom with ``Recipient``.

Requests are KMS JSON 1.1, signed with botocore's SigV4 (extra ``kms``) at an injected time, and sent over
a stream opened by :mod:`enclavekit.transport` — typically ``vsock://3:8000`` where the parent's
``vsock-proxy`` relays to ``kms.<region>.amazonaws.com:443``. TLS runs end to end with the KMS host name
as SNI and for certificate checking, so the proxy sees only ciphertext.

Results with a recipient carry ``ciphertext_for_recipient`` (raw bytes); open it with
:meth:`RecipientKey.unwrap <enclavekit.kms.recipient.RecipientKey.unwrap>` or use the ``*_plaintext``
helpers. Not done: retries, credential discovery (pass credentials explicitly), pagination, other KMS
operations.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from enclavekit.errors import Error, MalformedInput, UsageError, VerificationError
from enclavekit.kms._sigv4 import sign_headers
from enclavekit.kms.recipient import Recipient, RecipientKey
from enclavekit.transport.address import Address, TcpAddress, as_address
from enclavekit.transport.sockets import connect

#: KMS responses are small (CiphertextForRecipient ≤ 6144 base64 characters); refuse anything bigger.
MAX_RESPONSE_BYTES = 1024 * 1024
DEFAULT_TIMEOUT = 30.0


class KmsError(Error):
    """KMS (or the stand-in) refused the request; ``code`` is the KMS exception name (exit 1)."""

    exit_code = 1

    def __init__(self, code: str, message: str, status: int) -> None:
        self.code = code
        self.status = status
        super().__init__(f"KMS {code} (HTTP {status}): {message}")


@dataclass(frozen=True, slots=True)
class AwsCredentials:
    """Explicit AWS credentials (for an enclave: passed in by the parent, e.g. from IMDS)."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:
        return f"AwsCredentials(access_key_id={self.access_key_id!r}, secret_access_key=***)"


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What KMS returns when a Recipient was given."""

    key_id: str | None
    ciphertext_for_recipient: bytes
    #: GenerateDataKey only: the data key encrypted under the KMS key, to store next to your data.
    ciphertext_blob: bytes | None = None


class KmsClient:
    """KMS JSON API client over an enclavekit transport.

    ``endpoint``: the KMS URL (``https://kms.<region>.amazonaws.com``; ``http://`` only for local
    stand-ins). ``via``: where to open the byte stream (``vsock://3:8000``); default: the endpoint's
    own host and port. ``tls``: the SSL context for ``https`` (default: system trust store).
    """

    def __init__(
        self,
        *,
        region: str,
        credentials: AwsCredentials,
        endpoint: str | None = None,
        via: Address | str | None = None,
        tls: ssl.SSLContext | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.region = region
        self.endpoint = endpoint or f"https://kms.{region}.amazonaws.com"
        parts = urlsplit(self.endpoint)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise UsageError(f"KMS endpoint must be an https:// URL, got {self.endpoint!r}")
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._host_header = parts.netloc
        self._via = as_address(via) if via is not None else TcpAddress(self._host, self._port)
        self._tls = tls
        self._credentials = credentials
        self._timeout = timeout
        self._clock = clock

    # -- operations -------------------------------------------------------------------------
    def decrypt(
        self,
        ciphertext_blob: bytes,
        *,
        recipient: Recipient,
        key_id: str | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> RecipientResult:
        body: dict[str, Any] = {"CiphertextBlob": _b64(ciphertext_blob)}
        if key_id is not None:
            body["KeyId"] = key_id
        if encryption_context:
            body["EncryptionContext"] = dict(encryption_context)
        return self._recipient_call("Decrypt", body, recipient)

    def generate_data_key(
        self,
        key_id: str,
        *,
        recipient: Recipient,
        key_spec: str | None = "AES_256",
        number_of_bytes: int | None = None,
        encryption_context: Mapping[str, str] | None = None,
    ) -> RecipientResult:
        body: dict[str, Any] = {"KeyId": key_id}
        if number_of_bytes is not None:
            body["NumberOfBytes"] = number_of_bytes
        elif key_spec is not None:
            body["KeySpec"] = key_spec
        if encryption_context:
            body["EncryptionContext"] = dict(encryption_context)
        result = self._recipient_call("GenerateDataKey", body, recipient)
        if result.ciphertext_blob is None:
            raise MalformedInput("KMS GenerateDataKey response lacks CiphertextBlob")
        return result

    def generate_random(self, number_of_bytes: int, *, recipient: Recipient) -> RecipientResult:
        return self._recipient_call("GenerateRandom", {"NumberOfBytes": number_of_bytes}, recipient)

    # -- convenience: straight to plaintext ----------------------------------------------------
    def decrypt_plaintext(
        self,
        ciphertext_blob: bytes,
        *,
        key: RecipientKey,
        recipient: Recipient,
        expected_length: int | None = None,
        **kwargs: Any,
    ) -> bytes:
        """Decrypt and unwrap; pass ``expected_length`` when the plaintext's length is known."""
        return key.unwrap(
            self.decrypt(ciphertext_blob, recipient=recipient, **kwargs).ciphertext_for_recipient,
            expected_length=expected_length,
        )

    # -- plumbing -------------------------------------------------------------------------------
    def _recipient_call(
        self, operation: str, body: dict[str, Any], recipient: Recipient
    ) -> RecipientResult:
        body["Recipient"] = recipient.to_json()
        answer = self.call(operation, body)
        sealed = _field_bytes(answer, "CiphertextForRecipient", operation)
        if sealed is None:
            raise MalformedInput(
                f"KMS {operation} response lacks CiphertextForRecipient although a Recipient was sent"
            )
        if "Plaintext" in answer:
            raise MalformedInput(
                f"KMS {operation} response carries Plaintext next to CiphertextForRecipient; refusing it"
            )
        key_id = answer.get("KeyId")
        return RecipientResult(
            key_id if isinstance(key_id, str) else None,
            sealed,
            _field_bytes(answer, "CiphertextBlob", operation),
        )

    def call(self, operation: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Send one signed KMS JSON request and return the decoded JSON answer."""
        payload = json.dumps(body, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"TrentService.{operation}",
            "Host": self._host_header,
        }
        signed = sign_headers(
            method="POST",
            url=f"{self._scheme}://{self._host_header}/",
            headers=headers,
            body=payload,
            access_key=self._credentials.access_key_id,
            secret_key=self._credentials.secret_access_key,
            session_token=self._credentials.session_token,
            region=self.region,
            service="kms",
            now=self._clock(),
        )
        conn = _Connection(self._host, self._port, self._open_stream, self._timeout)
        try:
            conn.request("POST", "/", body=payload, headers=signed)
            response = conn.getresponse()
            data = response.read(MAX_RESPONSE_BYTES + 1)
            status = response.status
        except ssl.SSLCertVerificationError as exc:
            raise VerificationError(
                f"TLS certificate of {self._host} did not verify ({exc.verify_message}); the "
                f"stream via {self._via} does not end at the real KMS endpoint"
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise UsageError(
                f"KMS request {operation} to {self.endpoint} via {self._via} failed: {exc}"
            ) from exc
        finally:
            conn.close()
        if len(data) > MAX_RESPONSE_BYTES:
            raise MalformedInput(
                f"KMS {operation} response is larger than {MAX_RESPONSE_BYTES} bytes"
            )
        try:
            answer = json.loads(data) if data else {}
        except (ValueError, UnicodeDecodeError):
            raise MalformedInput(
                f"KMS {operation} answered HTTP {status} with non-JSON data"
            ) from None
        if not isinstance(answer, dict):
            raise MalformedInput(f"KMS {operation} answered with JSON {type(answer).__name__}")
        if status != 200:
            code = str(answer.get("__type", "UnknownError")).rsplit("#", 1)[-1]
            message = str(answer.get("message", answer.get("Message", "")))
            raise KmsError(code, message, status)
        return answer

    def _open_stream(self) -> socket.socket:
        sock = connect(self._via, timeout=self._timeout)
        sock.settimeout(self._timeout)
        if self._scheme == "http":
            return sock
        context = self._tls or ssl.create_default_context()
        return context.wrap_socket(sock, server_hostname=self._host)


class _Connection(http.client.HTTPConnection):
    """An HTTP/1.1 connection whose socket comes from a factory (vsock, TCP, TLS over either)."""

    def __init__(
        self, host: str, port: int, factory: Callable[[], socket.socket], timeout: float
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self._factory = factory

    def connect(self) -> None:
        self.sock = self._factory()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _field_bytes(answer: Mapping[str, Any], name: str, operation: str) -> bytes | None:
    value = answer.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedInput(f"KMS {operation} response field {name} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedInput(f"KMS {operation} response field {name} is not valid base64") from None

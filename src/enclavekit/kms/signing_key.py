"""An EC signing key held by AWS KMS, for signing EIFs (``--private-key arn:aws:kms:…``).

:class:`KmsSigningKey` has the three members of a pyca EC private key that signing uses (``curve``,
``public_key()``, ``sign(data, ECDSA(hash))``), so :class:`enclavekit.eif.sign.EifSigner` takes it in
place of a key on disk. Requests go through botocore (extra ``kms``) with the standard AWS
configuration: the credentials chain, ``AWS_ENDPOINT_URL_KMS`` / ``AWS_ENDPOINT_URL``, and the region
named in the ARN (else ``AWS_REGION`` / the profile's region).

Checked: the key is an ``ECC_NIST_P256/384/521`` key with usage ``SIGN_VERIFY`` that offers the
signing algorithm matching its curve (P-256 → ECDSA_SHA_256, P-384 → ECDSA_SHA_384, P-521 →
ECDSA_SHA_512); the signature KMS returns verifies with the key's public key before it is used.
Every KMS or credentials failure is a :class:`~enclavekit.errors.UsageError` (exit 2) carrying the
KMS error code and message. Not checked: key policy or grants (KMS decides), key rotation state.
"""

from __future__ import annotations

import re
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enclavekit.errors import UsageError

#: KMS key spec → (pyca curve, signing algorithm, hash). Only the NIST curves EIFs allow.
KEY_SPECS: dict[str, tuple[ec.EllipticCurve, str, type[hashes.HashAlgorithm]]] = {
    "ECC_NIST_P256": (ec.SECP256R1(), "ECDSA_SHA_256", hashes.SHA256),
    "ECC_NIST_P384": (ec.SECP384R1(), "ECDSA_SHA_384", hashes.SHA384),
    "ECC_NIST_P521": (ec.SECP521R1(), "ECDSA_SHA_512", hashes.SHA512),
}
#: KMS ``Sign`` with ``MessageType=RAW`` takes at most this many bytes (a COSE Sig_structure over a
#: PCR is ~200).
MAX_RAW_MESSAGE = 4096
#: ``arn:<partition>:kms:<region>:<account>:key/<id>`` or ``…:alias/<name>``.
_KMS_ARN = re.compile(
    r"^arn:(aws|aws-cn|aws-us-gov|aws-iso|aws-iso-b|aws-iso-e|aws-iso-f|aws-eusc):kms:"
    r"([a-z0-9-]+):(\d{12}):(key/[A-Za-z0-9-]+|alias/[A-Za-z0-9/_+=,.@-]+)$"
)


def is_kms_key_arn(value: str) -> bool:
    """Whether ``value`` names a KMS key or alias by ARN (what ``--private-key`` accepts besides a
    file)."""
    return value.startswith("arn:") and ":kms:" in value


def _botocore_session() -> Any:
    try:
        import botocore.session
    except ImportError:
        raise UsageError(
            "signing with a KMS key needs botocore: install enclavekit with the 'kms' extra "
            "(pip install 'enclavekit[kms]')"
        ) from None
    return botocore.session.get_session()


def _kms_failure(exc: Exception, operation: str, key_id: str) -> UsageError:
    """A UsageError carrying KMS's own error code and message (or the credentials problem)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        error = response["Error"]
        code, message = error.get("Code", "?"), error.get("Message", "")
        return UsageError(
            f"KMS {operation} for --private-key {key_id} failed: {code}: {message}; check the key "
            "ARN, its region and account, and that your credentials may call kms:GetPublicKey "
            "and kms:Sign on it"
        )
    return UsageError(
        f"KMS {operation} for --private-key {key_id} failed: {exc}; check the AWS credentials "
        "and region (AWS_REGION, AWS_PROFILE, AWS_ENDPOINT_URL_KMS)"
    )


class KmsSigningKey:
    """A KMS asymmetric key (``ECC_NIST_P256/384/521``, ``SIGN_VERIFY``) named by key or alias ARN.

    ``client``: a botocore KMS client (default: one made from the standard AWS configuration, in
    the ARN's region). ``GetPublicKey`` is called once, when the key is first used.
    """

    def __init__(self, key_id: str, *, client: Any = None) -> None:
        match = _KMS_ARN.match(key_id)
        if match is None:
            raise UsageError(
                f"--private-key {key_id!r} is not a KMS key ARN; expected "
                "arn:aws:kms:REGION:ACCOUNT:key/KEY-ID or arn:aws:kms:REGION:ACCOUNT:alias/NAME"
            )
        self.key_id = key_id
        self.region = match.group(2)
        self._client = client
        self._public: ec.EllipticCurvePublicKey | None = None
        self._spec: str | None = None

    def __repr__(self) -> str:
        return f"KmsSigningKey({self.key_id!r})"

    @property
    def client(self) -> Any:
        if self._client is None:
            session = _botocore_session()
            try:
                self._client = session.create_client("kms", region_name=self.region)
            except Exception as exc:  # botocore's configuration errors have no common base
                raise _kms_failure(exc, "client setup", self.key_id) from None
        return self._client

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        method = getattr(self.client, operation)
        try:
            result: dict[str, Any] = method(**params)
        except Exception as exc:  # ClientError, NoCredentialsError, EndpointConnectionError, ...
            name = "".join(part.title() for part in operation.split("_"))
            raise _kms_failure(exc, name, self.key_id) from None
        return result

    def _load(self) -> tuple[ec.EllipticCurvePublicKey, str]:
        if self._public is None or self._spec is None:
            answer = self._call("get_public_key", KeyId=self.key_id)
            spec = answer.get("KeySpec") or answer.get("CustomerMasterKeySpec")
            if spec not in KEY_SPECS:
                raise UsageError(
                    f"KMS key {self.key_id} has key spec {spec!r}; EIF signing needs "
                    "ECC_NIST_P256, ECC_NIST_P384 or ECC_NIST_P521"
                )
            if answer.get("KeyUsage") != "SIGN_VERIFY":
                raise UsageError(
                    f"KMS key {self.key_id} has key usage {answer.get('KeyUsage')!r}; create it "
                    "with --key-usage SIGN_VERIFY"
                )
            _, algorithm, _ = KEY_SPECS[spec]
            offered = answer.get("SigningAlgorithms") or []
            if algorithm not in offered:
                raise UsageError(
                    f"KMS key {self.key_id} does not offer {algorithm} (it offers "
                    f"{', '.join(offered) or 'none'})"
                )
            try:
                public = serialization.load_der_public_key(bytes(answer["PublicKey"]))
            except (KeyError, ValueError, TypeError) as exc:
                raise UsageError(
                    f"KMS GetPublicKey for {self.key_id} returned no usable public key ({exc})"
                ) from None
            if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
                public.curve, type(KEY_SPECS[spec][0])
            ):
                raise UsageError(
                    f"KMS GetPublicKey for {self.key_id}: the key does not match its spec {spec}"
                )
            self._public, self._spec = public, spec
        return self._public, self._spec

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._load()[0].curve

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._load()[0]

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """A DER ECDSA signature over ``data`` made by KMS ``Sign`` (``MessageType=RAW``), verified
        with the key's public key before it is returned."""
        public, spec = self._load()
        _, algorithm, digest = KEY_SPECS[spec]
        requested = getattr(signature_algorithm, "algorithm", None)
        if not isinstance(signature_algorithm, ec.ECDSA) or not isinstance(requested, digest):
            raise ValueError(f"a {spec} KMS key signs with {algorithm} only")
        if len(data) > MAX_RAW_MESSAGE:
            raise ValueError(f"KMS signs at most {MAX_RAW_MESSAGE} raw bytes, got {len(data)}")
        answer = self._call(
            "sign",
            KeyId=self.key_id,
            Message=data,
            MessageType="RAW",
            SigningAlgorithm=algorithm,
        )
        signature = bytes(answer.get("Signature") or b"")
        try:
            public.verify(signature, data, signature_algorithm)
        except InvalidSignature:
            raise UsageError(
                f"KMS Sign for {self.key_id} returned a signature that does not verify with the "
                "key's public key; refusing to write it"
            ) from None
        return signature

"""SigV4 signing and checking with botocore, with the signing time injected (never read from the host).

botocore's ``SigV4Auth.add_auth`` reads the wall clock itself; these helpers run the same steps with a
given time so that signing is testable and the stand-in KMS can recompute a signature.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Any

SIGV4_TIMESTAMP = "%Y%m%dT%H%M%SZ"


def _botocore() -> Any:
    try:
        import botocore.auth
        import botocore.awsrequest
        import botocore.credentials
    except ImportError:  # pragma: no cover - depends on the installed extras
        from enclavekit.errors import UsageError

        raise UsageError(
            "the KMS client needs botocore: install enclavekit with the 'kms' extra "
            "(pip install 'enclavekit[kms]')"
        ) from None
    return botocore


def sign_headers(
    *,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
    access_key: str,
    secret_key: str,
    session_token: str | None,
    region: str,
    service: str,
    now: datetime,
) -> dict[str, str]:
    """Return ``headers`` plus ``X-Amz-Date``, ``Authorization`` (and the session token header)."""
    botocore = _botocore()
    credentials = botocore.credentials.Credentials(access_key, secret_key, session_token)
    request = botocore.awsrequest.AWSRequest(method=method, url=url, data=body, headers=headers)
    auth = botocore.auth.SigV4Auth(credentials, service, region)
    request.context["timestamp"] = now.astimezone(UTC).strftime(SIGV4_TIMESTAMP)
    auth._modify_request_before_signing(request)
    canonical = auth.canonical_request(request)
    signature = auth.signature(auth.string_to_sign(request, canonical), request)
    auth._inject_signature_to_request(request, signature)
    return {str(k): str(v) for k, v in request.headers.items()}


def check_signature(
    *,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
    secret_key: str,
    region: str,
    service: str,
) -> bool:
    """Recompute the SigV4 signature of a received request (only its signed headers) and compare."""
    botocore = _botocore()
    lower = {k.lower(): v for k, v in headers.items()}
    authorization = lower.get("authorization", "")
    try:
        scheme, _, rest = authorization.partition(" ")
        parts = dict(p.strip().split("=", 1) for p in rest.split(","))
        access_key = parts["Credential"].split("/", 1)[0]
        signed = parts["SignedHeaders"].split(";")
        given = parts["Signature"]
        amz_date = lower["x-amz-date"]
    except (KeyError, ValueError):
        return False
    if scheme != "AWS4-HMAC-SHA256":
        return False
    credentials = botocore.credentials.Credentials(
        access_key, secret_key, lower.get("x-amz-security-token")
    )
    request = botocore.awsrequest.AWSRequest(
        method=method, url=url, data=body, headers={h: lower.get(h, "") for h in signed}
    )
    auth = botocore.auth.SigV4Auth(credentials, service, region)
    request.context["timestamp"] = amz_date
    canonical = auth.canonical_request(request)
    expected = auth.signature(auth.string_to_sign(request, canonical), request)
    return hmac.compare_digest(str(expected), given)

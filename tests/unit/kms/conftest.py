"""Keys and vectors for the KMS tests (files described in tests/assets/kms/README.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def _key(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


@pytest.fixture(scope="session")
def kms_assets(assets: Path) -> Path:
    return assets / "kms"


@pytest.fixture(scope="session")
def enclaver_key(kms_assets: Path) -> rsa.RSAPrivateKey:
    return _key(kms_assets / "enclaver-key.pem")


@pytest.fixture(scope="session")
def recipient_key(kms_assets: Path) -> rsa.RSAPrivateKey:
    return _key(kms_assets / "recipient-key.pem")


@pytest.fixture(scope="session")
def recipient_cert(kms_assets: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((kms_assets / "recipient-cert.pem").read_bytes())


@pytest.fixture(scope="session")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)

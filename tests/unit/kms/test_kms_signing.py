"""EIFs signed by an AWS KMS key (``--private-key arn:aws:kms:…``), against moto's KMS in server mode.

moto is an independent KMS implementation: it creates the keys and answers GetPublicKey and Sign; the
results are checked with describe-eif and, independently, with pyca and cbor2.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.session
import cbor2
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID
from tests.unit.build_enclave.conftest import blobs_dir
from tests.unit.build_enclave.factory import base_layer, docker_archive

from enclavekit.cli import cli
from enclavekit.eif.format import SectionType
from enclavekit.eif.reader import Eif
from enclavekit.eif.sign import EifSigner
from enclavekit.errors import UsageError
from enclavekit.kms.signing_key import KmsSigningKey

moto_server = pytest.importorskip("moto.server")

REGION = "eu-central-1"
CURVES = {
    "ECC_NIST_P256": (ec.SECP256R1(), hashes.SHA256()),
    "ECC_NIST_P384": (ec.SECP384R1(), hashes.SHA384()),
    "ECC_NIST_P521": (ec.SECP521R1(), hashes.SHA512()),
}


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The standard AWS configuration pointed at moto: credentials, region, AWS_ENDPOINT_URL_KMS."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", moto_endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_endpoint


def _kms(endpoint: str, **credentials: str) -> Any:
    session = botocore.session.get_session()
    return session.create_client(
        "kms",
        region_name=REGION,
        endpoint_url=endpoint,
        aws_access_key_id=credentials.get("key", "testing"),
        aws_secret_access_key=credentials.get("secret", "testing"),
    )


def _create_key(endpoint: str, spec: str = "ECC_NIST_P384", usage: str = "SIGN_VERIFY") -> str:
    return str(_kms(endpoint).create_key(KeySpec=spec, KeyUsage=usage)["KeyMetadata"]["Arn"])


def _certificate_for(endpoint: str, key_arn: str, path: Path) -> Path:
    """A certificate holding the KMS key's public key (issued by a throwaway CA key)."""
    der = _kms(endpoint).get_public_key(KeyId=key_arn)["PublicKey"]
    public = serialization.load_der_public_key(der)
    ca = ec.generate_private_key(ec.SECP384R1())
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kms signer")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
        .public_key(public)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .sign(ca, hashes.SHA384())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture
def unsigned_eif(tmp_path: Path, blobs_dir: Path) -> Path:
    image = docker_archive(tmp_path / "img.tar", [base_layer()])
    out = tmp_path / "app.eif"
    result = CliRunner().invoke(
        cli,
        [
            "build-enclave",
            "--image",
            str(image),
            "--output-file",
            str(out),
            "--blobs",
            str(blobs_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def _independent_check(eif_path: Path, cert_path: Path, curve_spec: str) -> None:
    """pyca + cbor2 only: the COSE_Sign1 verifies with the certificate's key over PcrInfo(0, PCR0)."""
    with Eif.open(eif_path) as eif:
        (section,) = [s for s in eif.sections if s.section_type == SectionType.SIGNATURE]
        data = b"".join(eif.iter_section(section))
    described = json.loads(
        CliRunner().invoke(cli, ["describe-eif", "--eif-path", str(eif_path), "--json"]).stdout
    )
    [item] = cbor2.loads(data)
    assert bytes(item["signing_certificate"]) == cert_path.read_bytes()
    protected, unprotected, payload, signature = cbor2.loads(bytes(item["signature"]))
    curve, digest = CURVES[curve_spec]
    assert cbor2.loads(protected) == {
        1: {"ECC_NIST_P256": -7, "ECC_NIST_P384": -35}.get(curve_spec, -36)
    }
    assert unprotected == {}
    assert cbor2.loads(payload) == {
        "register_index": 0,
        "register_value": list(bytes.fromhex(described["Measurements"]["PCR0"])),
    }
    size = (curve.key_size + 7) // 8
    der = encode_dss_signature(
        int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
    )
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    public = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(der, to_sign, ec.ECDSA(digest))  # raises if KMS's signature were wrong


@pytest.mark.parametrize("spec", sorted(CURVES))
def test_sign_eif_with_kms_key_verifies_in_describe_eif_and_pyca(
    spec: str, aws_env: str, unsigned_eif: Path, tmp_path: Path
) -> None:
    arn = _create_key(aws_env, spec)
    cert = _certificate_for(aws_env, arn, tmp_path / "kms-cert.pem")
    result = CliRunner().invoke(
        cli,
        [
            "sign-eif",
            "--eif-path",
            str(unsigned_eif),
            "--signing-certificate",
            str(cert),
            "--private-key",
            arn,
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    pcr8 = json.loads(result.stdout)["Measurements"]["PCR8"]
    described = CliRunner().invoke(cli, ["describe-eif", "--eif-path", str(unsigned_eif), "--json"])
    assert described.exit_code == 0, described.output
    info = json.loads(described.stdout)
    assert info["IsSigned"] is True
    assert info["SignatureCheck"] is True
    assert info["Measurements"]["PCR8"] == pcr8
    pcr = CliRunner().invoke(cli, ["pcr", "--signing-certificate", str(cert), "--json"])
    assert json.loads(pcr.stdout)["PCR8"] == pcr8
    _independent_check(unsigned_eif, cert, spec)


def test_kms_alias_arn_signs(aws_env: str, unsigned_eif: Path, tmp_path: Path) -> None:
    arn = _create_key(aws_env)
    account = arn.split(":")[4]
    alias = f"alias/eif-signer-{arn.rsplit('/', 1)[1]}"  # moto's state is shared in the process
    _kms(aws_env).create_alias(AliasName=alias, TargetKeyId=arn)
    alias_arn = f"arn:aws:kms:{REGION}:{account}:{alias}"
    cert = _certificate_for(aws_env, arn, tmp_path / "kms-cert.pem")
    out = tmp_path / "signed.eif"
    result = CliRunner().invoke(
        cli,
        [
            "sign-eif",
            "--eif-path",
            str(unsigned_eif),
            "--signing-certificate",
            str(cert),
            "--private-key",
            alias_arn,
            "--output-file",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    _independent_check(out, cert, "ECC_NIST_P384")


def test_build_enclave_signs_with_kms_key(aws_env: str, tmp_path: Path, blobs_dir: Path) -> None:
    arn = _create_key(aws_env, "ECC_NIST_P256")
    cert = _certificate_for(aws_env, arn, tmp_path / "kms-cert.pem")
    image = docker_archive(tmp_path / "img.tar", [base_layer()])
    out = tmp_path / "app.eif"
    result = CliRunner().invoke(
        cli,
        [
            "build-enclave",
            "--image",
            str(image),
            "--output-file",
            str(out),
            "--blobs",
            str(blobs_dir),
            "--signing-certificate",
            str(cert),
            "--private-key",
            arn,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "PCR8" in json.loads(result.stdout)["Measurements"]
    _independent_check(out, cert, "ECC_NIST_P256")


def test_attack_certificate_of_another_key_is_refused_before_kms_signs(
    aws_env: str, unsigned_eif: Path, tmp_path: Path
) -> None:
    """A certificate that does not hold the KMS key's public key would give a signature no verifier
    accepts (or, worse, a PCR8 that names someone else): refused before Sign, nothing written."""
    arn = _create_key(aws_env)
    other = _create_key(aws_env)
    cert = _certificate_for(aws_env, other, tmp_path / "other-cert.pem")
    out = tmp_path / "signed.eif"
    before = unsigned_eif.read_bytes()
    calls: list[str] = []

    class Spy(KmsSigningKey):
        def _call(self, operation: str, **params: Any) -> dict[str, Any]:
            calls.append(operation)
            return super()._call(operation, **params)

    with pytest.raises(UsageError, match="does not belong to the signing certificate"):
        EifSigner(cert.read_bytes(), Spy(arn))
    assert calls == ["get_public_key"]
    result = CliRunner().invoke(
        cli,
        [
            "sign-eif",
            "--eif-path",
            str(unsigned_eif),
            "--signing-certificate",
            str(cert),
            "--private-key",
            arn,
            "--output-file",
            str(out),
        ],
    )
    assert result.exit_code == 2, result.output
    assert arn in result.stderr
    assert not out.exists()
    assert unsigned_eif.read_bytes() == before


def test_attack_key_not_visible_to_caller_is_exit_2_with_kms_error_and_no_unsigned_eif(
    aws_env: str, unsigned_eif: Path, tmp_path: Path
) -> None:
    """aws-nitro-enclaves-cli#756: a KMS failure must never end in an unsigned EIF."""
    arn = _create_key(aws_env)
    cert = _certificate_for(aws_env, arn, tmp_path / "kms-cert.pem")
    # moto resolves keys by id within the caller's account and the ARN's region: a key the caller
    # cannot see there answers NotFoundException, as KMS does for an unshared foreign key.
    foreign = arn.replace(f":{REGION}:", ":us-west-2:")
    out = tmp_path / "signed.eif"
    result = CliRunner().invoke(
        cli,
        [
            "sign-eif",
            "--eif-path",
            str(unsigned_eif),
            "--signing-certificate",
            str(cert),
            "--private-key",
            foreign,
            "--output-file",
            str(out),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "KMS GetPublicKey" in result.stderr
    assert "NotFoundException" in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_attack_kms_denies_sign_build_leaves_no_eif(
    aws_env: str, tmp_path: Path, blobs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An IAM principal allowed kms:GetPublicKey but not kms:Sign: moto enforces the policy; the
    build fails with KMS's AccessDeniedException (exit 2) and leaves no EIF, signed or not."""
    from moto import settings

    arn = _create_key(aws_env)
    cert = _certificate_for(aws_env, arn, tmp_path / "kms-cert.pem")
    session = botocore.session.get_session()
    iam = session.create_client(
        "iam",
        region_name=REGION,
        endpoint_url=aws_env,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    iam.create_user(UserName="eif-builder")
    iam.put_user_policy(
        UserName="eif-builder",
        PolicyName="only-get-public-key",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "kms:GetPublicKey", "Resource": "*"}],
            }
        ),
    )
    access = iam.create_access_key(UserName="eif-builder")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", access["SecretAccessKey"])
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    image = docker_archive(tmp_path / "img.tar", [base_layer()])
    out = tmp_path / "app.eif"
    result = CliRunner().invoke(
        cli,
        [
            "build-enclave",
            "--image",
            str(image),
            "--output-file",
            str(out),
            "--blobs",
            str(blobs_dir),
            "--signing-certificate",
            str(cert),
            "--private-key",
            arn,
        ],
    )
    assert result.exit_code == 2, result.output
    assert "KMS Sign" in result.stderr
    assert "AccessDenied" in result.stderr
    assert not out.exists()
    assert list(tmp_path.glob("*.eif*")) == []


def test_encrypt_decrypt_key_is_refused(aws_env: str, tmp_path: Path) -> None:
    arn = _create_key(aws_env, "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
    cert = _certificate_for_any(tmp_path / "cert.pem")
    with pytest.raises(UsageError, match="key spec"):
        EifSigner(cert.read_bytes(), KmsSigningKey(arn))


def _certificate_for_any(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_not_a_kms_arn_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="not a KMS key ARN"):
        KmsSigningKey("arn:aws:iam::123456789012:role/x")


__all__ = ["blobs_dir"]  # the build tests' fixture, used here

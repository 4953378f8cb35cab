"""describe-eif JSON (spec eif.md §5.2), sign-eif and pcr through the CLI: output, exit codes."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from enclavekit.attestation.policy import load_policy, policy_from_mapping
from enclavekit.cli import cli
from enclavekit.eif.describe import describe_eif, signing_certificate_info
from enclavekit.eif.format import HEADER_SIZE
from enclavekit.eif.measure import pcr8_of_certificate
from enclavekit.eif.metadata import BuildInfo, IdentityInfo
from enclavekit.eif.reader import measure_eif
from enclavekit.eif.sign import decode_signature_section
from enclavekit.eif.signing import sign_eif
from enclavekit.errors import EifIntegrityError
from tests.unit.eif.helpers import SigningMaterial, SyntheticEif

MakeEif = Callable[..., SyntheticEif]


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def sections(raw: bytes) -> list[tuple[int, int, int]]:
    out, pos = [], HEADER_SIZE
    while pos < len(raw):
        section_type, _, size = struct.unpack(">HHQ", raw[pos : pos + 12])
        out.append((pos, section_type, size))
        pos += 12 + size
    return out


def rewrite_with_crc(path: Path, raw: bytearray) -> None:
    raw[544:548] = zlib.crc32(bytes(raw[:544] + raw[548:])).to_bytes(4, "big")
    path.write_bytes(bytes(raw))


# --- describe-eif JSON ------------------------------------------------------------------------------


def test_unsigned_describe_fields_order_and_values(make_eif: MakeEif) -> None:
    eif = make_eif()
    out = describe_eif(eif.path)
    assert list(out) == [
        "EifVersion",
        "Measurements",
        "IsSigned",
        "CheckCRC",
        "ImageName",
        "ImageVersion",
        "Metadata",
    ]
    assert out["EifVersion"] == 4
    assert out["Measurements"] == {
        "HashAlgorithm": "Sha384 { ... }",
        "PCR0": eif.pcr0.hex(),
        "PCR1": eif.pcr1.hex(),
        "PCR2": eif.pcr2.hex(),
    }
    assert out["IsSigned"] is False and out["CheckCRC"] is True
    assert (out["ImageName"], out["ImageVersion"]) == ("example.com/app", "1.0")


def test_metadata_flattens_custom_keys_and_sorts_nested_objects(make_eif: MakeEif) -> None:
    meta = describe_eif(make_eif().path)["Metadata"]
    assert list(meta) == [
        "BuildTime",
        "BuildTool",
        "BuildToolVersion",
        "OperatingSystem",
        "KernelVersion",
        "DockerInfo",
        "alpha",
        "zeta",
    ]
    assert list(meta["DockerInfo"]) == ["Config", "Id"]
    assert list(meta["DockerInfo"]["Config"]) == ["Cmd", "Env"]
    assert meta["DockerInfo"]["Config"]["Env"] == ["B=2", "A=1"]  # lists keep their order
    assert meta["alpha"] == {"x": 1, "y": 2} and list(meta["alpha"]) == ["x", "y"]
    assert "CustomMetadata" not in meta


def test_null_custom_metadata_adds_no_keys(make_eif: MakeEif) -> None:
    info = IdentityInfo("n", "v", BuildInfo("2024-01-01T00:00:00+00:00"))
    meta = describe_eif(make_eif(metadata=info).path)["Metadata"]
    assert list(meta)[-1] == "DockerInfo" and meta["DockerInfo"] is None


def test_metadata_section_bytes_are_compact_serde_json() -> None:
    info = IdentityInfo("img", "v1", BuildInfo("t", "nitro-cli", "1.4.2", "Linux", "4.14.256"))
    assert info.to_bytes() == (
        b'{"ImageName":"img","ImageVersion":"v1","BuildMetadata":{"BuildTime":"t",'
        b'"BuildTool":"nitro-cli","BuildToolVersion":"1.4.2","OperatingSystem":"Linux",'
        b'"KernelVersion":"4.14.256"},"DockerInfo":null,"CustomMetadata":null}'
    )
    assert IdentityInfo.from_bytes(info.to_bytes()) == info


def test_bitkey_certificate_info_matches_the_derived_example(eif_assets: Path) -> None:
    cert = x509.load_pem_x509_certificate((eif_assets / "bitkey-codesigning-leaf.pem").read_bytes())
    info = signing_certificate_info(cert)
    assert list(info) == ["IssuerName", "Algorithm", "NotBefore", "NotAfter", "Signature"]
    assert info["IssuerName"] == {
        "commonName": "Nitro Enclave Codesigning Intermediate CA",
        "countryName": "IN",
        "localityName": "Cyberspace",
        "organizationName": "Block",
        "organizationalUnitName": "Bitkey",
        "stateOrProvinceName": "Blockchain",
    }
    assert list(info["IssuerName"]) == sorted(info["IssuerName"])
    assert info["Algorithm"] == "ecdsa-with-SHA256"
    assert info["NotBefore"] == "Jun 18 21:04:00 2024 GMT"
    assert info["NotAfter"] == "Jun 18 21:04:00 2032 GMT"
    assert info["Signature"].startswith("30:45:02:21:00:F1:30:06:B2:")
    assert len(info["Signature"].split(":")) == 71


def test_single_digit_days_are_space_padded(signing_p384: SigningMaterial) -> None:
    cert = x509.load_pem_x509_certificate(signing_p384.cert_pem)
    assert signing_certificate_info(cert)["NotBefore"] == "Jan  5 03:04:05 2024 GMT"


# --- signing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("curve", ["p256", "p384", "p521"])
def test_sign_eif_then_describe_shows_a_valid_signature_and_pcr8(
    make_eif: MakeEif, request: pytest.FixtureRequest, curve: str
) -> None:
    material: SigningMaterial = request.getfixturevalue(f"signing_{curve}")
    eif = make_eif()
    before = eif.path.read_bytes()
    signed = sign_eif(eif.path, material.signer)
    raw = eif.path.read_bytes()
    assert raw[: len(before)][HEADER_SIZE:] == before[HEADER_SIZE:]  # appended, nothing moved
    layout = sections(raw)
    assert [s[1] for s in layout] == [1, 2, 5, 3, 3, 4]
    assert layout[-1][0] == len(before)
    out = describe_eif(eif.path)
    assert list(out) == [
        "EifVersion",
        "Measurements",
        "IsSigned",
        "SigningCertificate",
        "CheckCRC",
        "SignatureCheck",
        "ImageName",
        "ImageVersion",
        "Metadata",
    ]
    assert out["IsSigned"] is True and out["SignatureCheck"] is True and out["CheckCRC"] is True
    pcr8 = pcr8_of_certificate(material.cert_pem)
    assert out["Measurements"]["PCR8"] == pcr8.hex() == signed.pcr8.hex()  # type: ignore[union-attr]
    assert out["Measurements"]["PCR0"] == eif.pcr0.hex()
    assert measure_eif(eif.path) == signed


def test_resigning_replaces_the_signature_in_place(
    make_eif: MakeEif, signing_p256: SigningMaterial, signing_p384: SigningMaterial
) -> None:
    eif = make_eif()
    sign_eif(eif.path, signing_p256.signer)
    sign_eif(eif.path, signing_p384.signer)
    raw = eif.path.read_bytes()
    layout = sections(raw)
    assert [s[1] for s in layout] == [1, 2, 5, 3, 3, 4]
    start, _, size = layout[-1]
    (element,) = decode_signature_section(raw[start + 12 : start + 12 + size])
    assert element.signing_certificate == signing_p384.cert_pem
    assert measure_eif(eif.path).pcr8 == pcr8_of_certificate(signing_p384.cert_pem)


def test_build_time_signing_equals_sign_eif_layout(
    make_eif: MakeEif, signing_p384: SigningMaterial
) -> None:
    built = make_eif("built.eif", signer=signing_p384.signer)
    later = make_eif("later.eif")
    sign_eif(later.path, signing_p384.signer, output=later.path.with_name("out.eif"))
    a, b = built.path.read_bytes(), later.path.with_name("out.eif").read_bytes()
    # same sections and offsets; only the signature size varies (ECDSA bytes >= 24 take 2 CBOR bytes)
    assert sections(a)[:-1] == sections(b)[:-1]
    assert sections(a)[-1][:2] == sections(b)[-1][:2]
    assert measure_eif(built.path) == measure_eif(later.path.with_name("out.eif"))


def test_signature_moved_to_another_image_fails_the_signature_check(
    make_eif: MakeEif, signing_p384: SigningMaterial
) -> None:
    """A genuine signature over another image's PCR0 gives SignatureCheck false and exit 1."""
    eif = make_eif(signer=signing_p384.signer)
    raw = bytearray(eif.path.read_bytes())
    ramdisk = sections(bytes(raw))[4]
    raw[ramdisk[0] + 12] ^= 0xFF  # change the image, keep the old signature, fix the CRC
    rewrite_with_crc(eif.path, raw)
    out = describe_eif(eif.path)
    assert out["CheckCRC"] is True and out["SignatureCheck"] is False
    code, stdout, stderr = run("describe-eif", "--eif-path", str(eif.path), "--json")
    assert code == 1
    assert json.loads(stdout)["SignatureCheck"] is False
    assert "signs a PCR0 other than" in stderr
    with pytest.raises(EifIntegrityError):
        measure_eif(eif.path)


def test_forged_cose_signature_is_an_integrity_error(
    make_eif: MakeEif, signing_p384: SigningMaterial
) -> None:
    """A tampered COSE signature (CRC recomputed) is refused with exit 1 and no JSON."""
    eif = make_eif(signer=signing_p384.signer)
    raw = bytearray(eif.path.read_bytes())
    raw[-1] ^= 0x01  # last byte of the COSE signature inside the signature section
    rewrite_with_crc(eif.path, raw)
    code, stdout, stderr = run("describe-eif", "--eif-path", str(eif.path), "--json")
    assert code == 1
    assert stdout == ""
    assert "does not verify" in stderr
    assert "Traceback" not in stderr


def test_sign_eif_refuses_a_damaged_image(make_eif: MakeEif, signing_p384: SigningMaterial) -> None:
    """An image whose CRC does not match is not signed (the signature would bless damage)."""
    eif = make_eif()
    raw = bytearray(eif.path.read_bytes())
    raw[-1] ^= 1
    eif.path.write_bytes(bytes(raw))
    with pytest.raises(EifIntegrityError, match="refusing to sign"):
        sign_eif(eif.path, signing_p384.signer)
    assert eif.path.read_bytes() == bytes(raw)


# --- CLI ----------------------------------------------------------------------------------------------


def test_cli_describe_json_equals_library_output(make_eif: MakeEif) -> None:
    eif = make_eif()
    code, stdout, _ = run("describe-eif", "--eif-path", str(eif.path), "--json")
    assert code == 0
    assert json.loads(stdout) == describe_eif(eif.path)
    assert stdout.startswith('{\n  "EifVersion": 4,\n  "Measurements": {\n    "HashAlgorithm"')


def test_cli_describe_prints_nitro_cli_json_and_a_human_summary(make_eif: MakeEif) -> None:
    """Like nitro-cli, the JSON is on stdout by default; the summary goes to stderr (not with --json)."""
    eif = make_eif()
    code, stdout, stderr = run("describe-eif", "--eif-path", str(eif.path))
    assert code == 0
    assert json.loads(stdout) == describe_eif(eif.path)
    assert eif.pcr0.hex() in stderr and "unsigned" in stderr


def test_cli_hash_algorithm_label_is_configurable(make_eif: MakeEif) -> None:
    eif = make_eif()
    args = ("describe-eif", "--eif-path", str(eif.path), "--json")
    code, stdout, _ = run(*args, "--hash-algorithm-label", "nitro-cli-1.5")
    assert code == 0
    assert json.loads(stdout)["Measurements"]["HashAlgorithm"] == "Sha512_384 { .. }"


def test_cli_bad_crc_prints_json_and_exits_1(make_eif: MakeEif) -> None:
    eif = make_eif()
    raw = bytearray(eif.path.read_bytes())
    raw[-1] ^= 1
    eif.path.write_bytes(bytes(raw))
    code, stdout, stderr = run("describe-eif", "--eif-path", str(eif.path), "--json")
    assert code == 1
    assert json.loads(stdout)["CheckCRC"] is False
    assert "CRC mismatch" in stderr


@pytest.mark.parametrize(
    ("content", "code", "message"),
    [
        (b"not an eif at all", 2, "548"),
        (b"ABCD" + bytes(600), 2, "magic"),
    ],
)
def test_cli_unreadable_input_exits_2(
    tmp_path: Path, content: bytes, code: int, message: str
) -> None:
    path = tmp_path / "bad.eif"
    path.write_bytes(content)
    exit_code, stdout, stderr = run("describe-eif", "--eif-path", str(path), "--json")
    assert (exit_code, stdout) == (code, "")
    assert message in stderr and "Traceback" not in stderr


def test_cli_truncated_eif_exits_1(make_eif: MakeEif) -> None:
    eif = make_eif()
    eif.path.write_bytes(eif.path.read_bytes()[:-10])
    code, _, stderr = run("describe-eif", "--eif-path", str(eif.path), "--json")
    assert code == 1 and "truncated" in stderr


def test_cli_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    code, _, _ = run("describe-eif", "--eif-path", str(tmp_path / "missing.eif"))
    assert code == 2


def test_cli_sign_eif_then_describe(make_eif: MakeEif, signing_p384: SigningMaterial) -> None:
    eif = make_eif()
    out_path = eif.path.with_name("signed.eif")
    code, stdout, stderr = run(
        "sign-eif",
        "--eif-path",
        str(eif.path),
        "--signing-certificate",
        str(signing_p384.cert_path),
        "--private-key",
        str(signing_p384.key_path),
        "--output-file",
        str(out_path),
        "--json",
    )
    assert code == 0, stderr
    assert "Enclave Image successfully signed." in stderr
    printed = json.loads(stdout)
    assert list(printed) == ["Measurements"]
    assert printed["Measurements"]["PCR8"] == pcr8_of_certificate(signing_p384.cert_pem).hex()
    assert describe_eif(eif.path)["IsSigned"] is False  # the input is untouched
    described = describe_eif(out_path)
    assert described["SignatureCheck"] is True
    assert described["Measurements"] == printed["Measurements"]


def test_cli_sign_eif_with_a_foreign_key_exits_2(
    make_eif: MakeEif, signing_p384: SigningMaterial, signing_p256: SigningMaterial
) -> None:
    eif = make_eif()
    code, _, stderr = run(
        "sign-eif",
        "--eif-path",
        str(eif.path),
        "--signing-certificate",
        str(signing_p384.cert_path),
        "--private-key",
        str(signing_p256.key_path),
    )
    assert code == 2 and "does not belong" in stderr
    assert describe_eif(eif.path)["IsSigned"] is False


def test_cli_pcr_input_and_certificate(tmp_path: Path, eif_assets: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"")
    code, stdout, _ = run("pcr", "--input", str(blob), "--json")
    assert code == 0
    assert stdout == (
        '{\n  "PCR": "21b9efbc184807662e966d34f390821309eeac6802309798826296bf3e8bec7c'
        '10edb30948c90ba67310f7b964fc500a"\n}\n'
    )
    code, stdout, _ = run(
        "pcr", "--signing-certificate", str(eif_assets / "bitkey-codesigning-leaf.pem"), "--json"
    )
    assert json.loads(stdout) == {
        "PCR8": "180ed42dffb8e71132b21c3180388e412973099f267e831d9c3dd71ad9ffd5f4"
        "05515d1029dc4cd92364b082a8ed65e1"
    }


def test_cli_pcr_instance_id_and_role() -> None:
    code, stdout, _ = run("pcr", "--instance-id", "i-1234567890abcdef0", "--json")
    assert code == 0 and json.loads(stdout)["PCR"].startswith("08f996b5d43e047a")
    code, stdout, _ = run("pcr", "--iam-role", "arn:aws:iam::123456789012:role/Webserver", "--json")
    assert code == 0 and json.loads(stdout)["PCR"].startswith("78fce75db17cd4e0")
    code, stdout, stderr = run("pcr", "--instance-id", "i-1234567890abcdef0")
    assert code == 0 and json.loads(stdout)["PCR"].startswith("08f996b5") and "08f996b5" in stderr


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("--instance-id", "i-1", "--iam-role", "arn:aws:iam::1:role/x"),
        ("--iam-role", "not-an-arn"),
        ("--instance-id", " i-1"),
    ],
)
def test_cli_pcr_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    code, stdout, stderr = run("pcr", *args)
    assert code == 2 and stdout == "" and "Traceback" not in stderr


# --- describe-eif JSON as a verifier policy ---------------------------------------------------------


def test_describe_json_is_accepted_as_a_policy(
    tmp_path: Path, make_eif: MakeEif, signing_p384: SigningMaterial
) -> None:
    eif = make_eif(signer=signing_p384.signer)
    code, stdout, _ = run("describe-eif", "--eif-path", str(eif.path), "--json")
    assert code == 0
    described = json.loads(stdout)
    policy_from_mapping(described)
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(stdout)
    assert load_policy(policy_file) == policy_from_mapping(described)
    code, stdout, _ = run(
        "sign-eif",
        "--eif-path",
        str(eif.path),
        "--signing-certificate",
        str(signing_p384.cert_path),
        "--private-key",
        str(signing_p384.key_path),
        "--json",
    )
    policy_from_mapping(json.loads(stdout))

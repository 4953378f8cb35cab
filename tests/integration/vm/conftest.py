"""Fixtures for the QEMU nitro-enclave tests: the setup cache, a signed test EIF, one boot of it."""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from enclavekit.vm.qemu import find_cache_dir, supports_nitro_enclave
from enclavekit.vm.state import list_records
from tests.unit.build_enclave.factory import write_signing_files

from .guest import HOST_PYTHON, build_test_eif

ROLE = "arn:aws:iam::123456789012:role/Webserver"
INSTANCE = "i-1234567890abcdef0"
SETUP_HINT = (
    "run `scripts/qemu-nitro/setup.sh` (builds QEMU with nitro-enclave, fetches the guest kernel)"
)

GUEST_PROGRAM = r"""
import json
from enclavekit.errors import NsmError
from enclavekit.nsm import Nsm

out = {}
with Nsm.device() as nsm:
    desc = nsm.describe_nsm()
    out["module_id"] = desc.module_id
    out["locked"] = list(desc.locked_pcrs)
    out["pcrs"] = {str(i): nsm.describe_pcr(i).data.hex() for i in range(17)}
    out["extend16"] = nsm.extend_pcr(16, b"enclavekit").hex()
    nsm.lock_pcr(16)
    out["pcr16_locked"] = nsm.describe_pcr(16).lock
    try:
        nsm.extend_pcr(16, b"after lock")
        out["extend_after_lock"] = "accepted"
    except NsmError as exc:
        out["extend_after_lock"] = exc.code
    out["random_len"] = len(nsm.get_random(32))
    out["attestation"] = nsm.attestation(user_data=b"user-data", nonce=b"nonce-1234").hex()
print("EK-RESULT " + json.dumps(out), flush=True)
"""


@pytest.fixture(scope="session")
def vm_cache() -> Path:
    cache = find_cache_dir(start=Path(__file__).resolve().parent)
    if cache is None:
        pytest.skip(f"no .cache/qemu-nitro: {SETUP_HINT}")
    qemu = cache / "qemu" / "bin" / "qemu-system-x86_64"
    needed = [qemu, cache / "kernel" / "vmlinuz", cache / "preinit", HOST_PYTHON]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: {SETUP_HINT}")
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the test guest runs Debian's python3.11 with this venv's compiled packages")
    if not supports_nitro_enclave(qemu):
        pytest.skip(f"{qemu} has no nitro-enclave machine: {SETUP_HINT}")
    return cache


@pytest.fixture(scope="session")
def vm_qemu(vm_cache: Path) -> Path:
    return vm_cache / "qemu" / "bin" / "qemu-system-x86_64"


@pytest.fixture(scope="session")
def signing_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("signing")
    # Valid now: run-enclave checks the signing certificate's validity at launch.
    now = datetime.datetime.now(datetime.UTC)
    return write_signing_files(folder, not_before=now - datetime.timedelta(days=1), days=31)


@pytest.fixture(scope="session")
def signed_eif(
    vm_cache: Path, tmp_path_factory: pytest.TempPathFactory, signing_files: tuple[Path, Path]
) -> Path:
    from enclavekit.eif.sign import EifSigner

    work = tmp_path_factory.mktemp("vm-eif")
    path, _ = build_test_eif(
        vm_cache, work, GUEST_PROGRAM, name="nsm-probe", signer=EifSigner.from_files(*signing_files)
    )
    return path


@pytest.fixture(scope="session")
def booted(
    signed_eif: Path, vm_qemu: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Boot the signed EIF once (PCR3/PCR4 from ROLE/INSTANCE); the guest's results and the console."""
    from enclavekit.vm.runner import run_enclave_vm

    records = tmp_path_factory.mktemp("vm-records")
    chunks: list[str] = []
    enclave = run_enclave_vm(
        signed_eif,
        cpu_count=1,
        memory_mib=512,
        debug_mode=True,
        console=chunks.append,
        parent_role=ROLE,
        parent_id=INSTANCE,
        qemu=vm_qemu,
        records=records,
        boot_timeout=240,
    )
    try:
        described = [r.describe_json() for r in list_records(records)]
        enclave.wait(240)
    finally:
        enclave.terminate()
    console = "".join(chunks)
    match = re.search(r"^EK-RESULT (\{.*\})\s*$", console, re.MULTILINE)
    assert match, f"the guest printed no result; console:\n{console[-3000:]}"
    return {
        "result": json.loads(match.group(1)),
        "console": console,
        "described": described,
        "record": enclave.record,
    }


VSOCK_GUEST_PROGRAM = r"""
import json
import socket
from enclavekit.nsm import Nsm

out = {}
with Nsm.device() as nsm:
    out["pcr8"] = nsm.describe_pcr(8).data.hex()
    out["pcr2"] = nsm.describe_pcr(2).data.hex()
# Enclave -> parent: CID 3 port 8000 is forwarded by the parent to a local echo server.
blob = bytes(range(256)) * 400  # 100 KiB: several RX buffers and credit updates
with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as s:
    s.connect((3, 8000))
    s.sendall(blob)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while chunk := s.recv(65536):
        got += chunk
out["echo_ok"] = got == blob[::-1]
out["echo_len"] = len(got)
# Parent -> enclave: a server on vsock port 5005, reached through the parent's local listener.
with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as srv:
    srv.bind((socket.VMADDR_CID_ANY, 5005))
    srv.listen(1)
    print("EK-LISTENING", flush=True)
    conn, peer = srv.accept()
    with conn:
        data = conn.recv(1024)
        conn.sendall(b"enclave says: " + data)
    out["peer_cid"] = peer[0]
print("EK-RESULT " + json.dumps(out), flush=True)
"""


@pytest.fixture(scope="session")
def unsigned_eif(vm_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("vm-eif-unsigned")
    path, _ = build_test_eif(vm_cache, work, VSOCK_GUEST_PROGRAM, name="vsock-probe")
    return path

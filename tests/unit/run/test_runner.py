"""run-enclave / describe / console / terminate, with real supervisor processes (process mode)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from enclavekit.errors import UsageError
from enclavekit.run import runner
from enclavekit.run.state import EnclaveStore, pid_alive
from tests.unit.run.conftest import d, f, make_eif

PROBE = (
    '"$ENCLAVEKIT_PYTHON" -c "from enclavekit.nsm import Nsm; n = Nsm.open();'
    " print('PCR0', n.describe_pcr(0).data.hex()); print('ID', n.describe_nsm().module_id);"
    " print('FILE', open('data/hello.txt').read())\"; echo CID=$ENCLAVEKIT_VSOCK_CID; exec sleep 60"
)


@pytest.fixture
def probe_eif(tmp_path: Path) -> Path:
    return make_eif(
        tmp_path / "probe.eif",
        cmd=["/bin/sh", "-c", PROBE],
        files=[d("rootfs/data"), f("rootfs/data/hello.txt", b"from the rootfs")],
    )


def _console(store: EnclaveStore, record: runner.st.EnclaveRecord, marker: str) -> str:
    deadline = time.monotonic() + 30
    text = ""
    while time.monotonic() < deadline:
        text = b"".join(runner.follow_console(store, record, disconnect_timeout=0)).decode()
        if marker in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{marker!r} never appeared in the console:\n{text}")


def test_run_describe_console_terminate(probe_eif: Path, store: EnclaveStore) -> None:
    record = runner.run_enclave(
        runner.RunOptions(eif_path=probe_eif, isolation="process", cpu_count=1, memory_mib=64),
        store=store,
    )
    assert record.state == "RUNNING" and record.cid == 16 and pid_alive(record.pid)
    text = _console(store, record, "CID=")
    assert f"PCR0 {record.measurements['PCR0']}" in text  # the NSM measures this very EIF
    assert f"ID {record.enclave_id}" in text
    assert "FILE from the rootfs" in text  # cwd is the rootfs
    assert "CID=16" in text
    [described] = runner.describe_enclaves(store)
    assert list(described.describe()) == [
        "EnclaveName",
        "EnclaveID",
        "ProcessID",
        "EnclaveCID",
        "NumberOfCPUs",
        "CPUIDs",
        "MemoryMiB",
        "State",
        "Flags",
        "Measurements",
    ]
    assert described.describe()["Flags"] == "NONE"
    assert runner.terminate_enclave(record, store=store)
    assert runner.describe_enclaves(store) == []
    assert not pid_alive(record.pid)
    archived = store.root / "logs" / f"{record.enclave_id}.log"
    assert "PCR0" in archived.read_text()


def test_debug_mode_zeroes_pcr0_in_the_nsm(probe_eif: Path, store: EnclaveStore) -> None:
    record = runner.run_enclave(
        runner.RunOptions(eif_path=probe_eif, isolation="process", debug_mode=True),
        store=store,
    )
    assert record.describe()["Flags"] == "DEBUG_MODE"
    assert "PCR0 " + "00" * 48 in _console(store, record, "CID=")
    runner.terminate_enclave(record, store=store)


def test_second_enclave_gets_the_next_cid_and_a_taken_cid_is_refused(
    probe_eif: Path, store: EnclaveStore
) -> None:
    first = runner.run_enclave(
        runner.RunOptions(eif_path=probe_eif, isolation="process", enclave_cid=20), store=store
    )
    with pytest.raises(UsageError, match="used by a running enclave"):
        runner.run_enclave(
            runner.RunOptions(eif_path=probe_eif, isolation="process", enclave_cid=20),
            store=store,
        )
    second = runner.run_enclave(
        runner.RunOptions(eif_path=probe_eif, isolation="process"), store=store
    )
    assert second.cid == 16
    assert {r.enclave_id for r in runner.describe_enclaves(store)} == {
        first.enclave_id,
        second.enclave_id,
    }


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"enclave_cid": 3}, "reserved"),
        ({"cpu_count": 0}, "cpu-count"),
        ({"cpu_count": 100_000}, "offers"),
        ({"memory_mib": 0}, "memory"),
        ({"isolation": "vm"}, "isolation"),
    ],
)
def test_bad_options_are_usage_errors(
    probe_eif: Path, store: EnclaveStore, changes: dict[str, object], message: str
) -> None:
    options = runner.RunOptions(eif_path=probe_eif, isolation="process")
    with pytest.raises(UsageError, match=message):
        runner.run_enclave(runner.RunOptions(**{**_fields(options), **changes}), store=store)
    assert not (store.root / "enclaves").exists() or not any((store.root / "enclaves").iterdir())


def test_memory_smaller_than_four_times_the_eif_is_refused(
    tmp_path: Path, store: EnclaveStore
) -> None:
    big = make_eif(
        tmp_path / "big.eif", cmd=["/bin/true"], files=[f("rootfs/blob", b"\1" * 600_000)]
    )
    with pytest.raises(UsageError, match="4 x the EIF size"):
        runner.run_enclave(
            runner.RunOptions(eif_path=big, isolation="process", memory_mib=2), store=store
        )


def test_missing_eif_is_a_usage_error(tmp_path: Path, store: EnclaveStore) -> None:
    with pytest.raises(UsageError, match="no such file"):
        runner.run_enclave(runner.RunOptions(eif_path=tmp_path / "nope.eif"), store=store)


def test_an_app_that_exits_at_once_still_reports_and_leaves_no_record(
    tmp_path: Path, store: EnclaveStore
) -> None:
    eif = make_eif(tmp_path / "quick.eif", cmd=["/bin/sh", "-c", "echo bye"])
    record = runner.run_enclave(runner.RunOptions(eif_path=eif, isolation="process"), store=store)
    assert record.enclave_id
    deadline = time.monotonic() + 15
    while runner.describe_enclaves(store) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runner.describe_enclaves(store) == []
    assert "bye" in (store.root / "logs" / f"{record.enclave_id}.log").read_text()


def test_find_enclave_lists_what_runs(store: EnclaveStore) -> None:
    with pytest.raises(UsageError, match="running: none"):
        runner.find_enclave(store, enclave_id="i-0-enc0")


@pytest.mark.skipif(not runner.chroot_supported(), reason="needs root and mount namespaces")
def test_chroot_mode_runs_inside_the_rootfs(tmp_path: Path, store: EnclaveStore) -> None:
    eif = make_eif(
        tmp_path / "chroot.eif",
        cmd=["/bin/sh", "-c", "cat /data/hello.txt; echo; ls /run/enclavekit; exec sleep 60"],
        files=[d("rootfs/data"), f("rootfs/data/hello.txt", b"inside the chroot")],
    )
    record = runner.run_enclave(
        runner.RunOptions(
            eif_path=eif, isolation="chroot", host_mounts=("/usr", "/bin", "/lib", "/lib64")
        ),
        store=store,
    )
    text = _console(store, record, "nsm.sock")
    assert "inside the chroot" in text
    runner.terminate_enclave(record, store=store)
    # Mounts lived in the enclave's own namespace: nothing is left mounted on the host.
    assert not any(
        str(store.root) in line for line in Path("/proc/self/mounts").read_text().splitlines()
    )


def _fields(options: runner.RunOptions) -> dict[str, object]:
    return {name: getattr(options, name) for name in options.__dataclass_fields__}


def test_enclave_directory_is_private(probe_eif: Path, store: EnclaveStore) -> None:
    """An unpacked image may hold set-uid files; other users must not reach them."""
    record = runner.run_enclave(
        runner.RunOptions(eif_path=probe_eif, isolation="process"), store=store
    )
    mode = store.enclave_dir(record.enclave_id).stat().st_mode & 0o777
    assert mode == 0o700


@pytest.mark.skipif(not runner.chroot_supported(), reason="needs root and mount namespaces")
def test_chroot_mode_reports_a_command_missing_from_the_image(
    tmp_path: Path, store: EnclaveStore
) -> None:
    eif = make_eif(tmp_path / "missing.eif", cmd=["no-such-program", "arg"])
    with pytest.raises(runner.EnclaveStartError) as caught:
        runner.run_enclave(runner.RunOptions(eif_path=eif, isolation="chroot"), store=store)
    assert "no-such-program: not found in /sbin:/usr/sbin:/bin:/usr/bin" in str(caught.value)
    log = str(caught.value).rsplit("console log: ", 1)[1]
    assert "no-such-program: not found" in Path(log).read_text()
    assert runner.describe_enclaves(store) == []


def test_signed_eif_puts_pcr8_in_the_nsm(tmp_path: Path, store: EnclaveStore) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from enclavekit.eif.sign import EifSigner

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "signer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    signer = EifSigner(cert.public_bytes(serialization.Encoding.PEM), key)
    probe = PROBE.replace("'PCR0', n.describe_pcr(0)", "'PCR8', n.describe_pcr(8)")
    eif = make_eif(
        tmp_path / "signed.eif",
        cmd=["/bin/sh", "-c", probe],
        files=[d("rootfs/data"), f("rootfs/data/hello.txt", b"x")],
        signer=signer,
    )
    record = runner.run_enclave(runner.RunOptions(eif_path=eif, isolation="process"), store=store)
    assert record.measurements["PCR8"] == signer.pcr8.hex()
    assert f"PCR8 {signer.pcr8.hex()}" in _console(store, record, "CID=")


def test_processes_left_by_the_app_end_with_the_enclave(
    tmp_path: Path, store: EnclaveStore
) -> None:
    """A daemon forked by the application must not outlive the enclave."""
    pid_file = tmp_path / "daemon.pid"
    eif = make_eif(
        tmp_path / "daemon.eif",
        cmd=["/bin/sh", "-c", f"sleep 60 & echo $! > {pid_file}; echo started"],
    )
    runner.run_enclave(runner.RunOptions(eif_path=eif, isolation="process"), store=store)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (pid_file.exists() and pid_file.read_text()):
        time.sleep(0.05)
    daemon = int(pid_file.read_text())
    while time.monotonic() < deadline and pid_alive(daemon):
        time.sleep(0.05)
    assert not pid_alive(daemon)


def test_attack_damaged_eif_with_crc_mismatch_at_the_end_starts_nothing(
    tmp_path: Path, store: EnclaveStore
) -> None:
    """The EIF is unpacked while it is read; a CRC mismatch found at its very end must leave no
    enclave started, no record, and no unpacked file anywhere in the state directory."""
    from enclavekit.errors import EifIntegrityError

    marker = tmp_path / "started"
    eif = make_eif(
        tmp_path / "app.eif",
        cmd=["/bin/sh", "-c", f"echo ran > {marker}; exec sleep 60"],
        env=["PATH=/usr/bin:/bin", "LAST=the-very-last-bytes"],
        files=[d("rootfs/data"), f("rootfs/data/hello.txt", b"from the rootfs")],
    )
    raw = bytearray(eif.read_bytes())
    raw[raw.rindex(b"LAST=the-very-last-bytes")] ^= 0x01
    eif.write_bytes(bytes(raw))
    with pytest.raises(EifIntegrityError, match="CRC mismatch"):
        runner.run_enclave(
            runner.RunOptions(eif_path=eif, isolation="process", cpu_count=1, memory_mib=64),
            store=store,
        )
    time.sleep(0.5)
    assert not marker.exists()
    assert store.all() == []
    leftovers = [p for p in store.root.rglob("*") if p.name in ("hello.txt", "cmd", "env")]
    assert leftovers == []

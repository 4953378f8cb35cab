"""Enclave records: nitro-cli JSON shapes, persistence, stale-record cleanup, socket paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from enclavekit.errors import MalformedInput, UsageError
from enclavekit.run import state as st


def _record(**changes: object) -> st.EnclaveRecord:
    base = st.EnclaveRecord(
        name="app",
        enclave_id="i-0123456789abcdef0-enc0123456789abcdef",
        cid=16,
        cpu_ids=(1, 3),
        memory_mib=512,
        debug_mode=False,
        eif_path="/x/app.eif",
        measurements={"HashAlgorithm": "Sha384 { ... }", "PCR0": "00" * 48},
        isolation="process",
        state=st.STATE_RUNNING,
        pid=os.getpid(),
        metadata={"ImageName": "app", "ImageVersion": "1", "Metadata": {}},
    )
    return base.replace(**changes)


def test_run_info_has_nitro_cli_fields_in_order() -> None:
    assert _record().run_info() == {
        "EnclaveName": "app",
        "EnclaveID": "i-0123456789abcdef0-enc0123456789abcdef",
        "ProcessID": os.getpid(),
        "EnclaveCID": 16,
        "NumberOfCPUs": 2,
        "CPUIDs": [1, 3],
        "MemoryMiB": 512,
    }


def test_describe_flags_and_metadata() -> None:
    assert _record(debug_mode=True).describe()["Flags"] == "DEBUG_MODE"
    assert "ImageName" not in _record().describe()
    assert _record().describe(with_metadata=True)["ImageVersion"] == "1"


def test_records_round_trip_and_stale_ones_are_removed(tmp_path: Path) -> None:
    store = st.EnclaveStore(tmp_path)
    live = _record()
    dead = _record(enclave_id="i-0123456789abcdef0-enc00000000000000ff", pid=2**22 + 12345)
    store.save(live)
    store.save(dead)
    assert store.load(live.enclave_id) == live
    assert store.all() == [live]
    assert store.load(dead.enclave_id) is None


def test_damaged_record_is_malformed_input(tmp_path: Path) -> None:
    store = st.EnclaveStore(tmp_path)
    store.save(_record())
    path = store.enclave_dir(_record().enclave_id) / st.RECORD_FILE
    path.write_text('{"name": 1')
    with pytest.raises(MalformedInput):
        store.load(_record().enclave_id)
    assert store.all() == []  # listed records skip damaged ones


def test_enclave_id_cannot_name_another_directory(tmp_path: Path) -> None:
    """An id with a slash or '..' must not point the store outside its directory."""
    with pytest.raises(ValueError):
        st.EnclaveStore(tmp_path).enclave_dir("../../etc")


def test_state_root_precedence(tmp_path: Path) -> None:
    assert st.state_root({"ENCLAVEKIT_STATE_DIR": "/a", "XDG_STATE_HOME": "/b"}) == Path("/a")
    assert st.state_root({"XDG_STATE_HOME": "/b"}) == Path("/b/enclavekit")


def test_deep_state_dirs_get_short_socket_directories(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 90)
    assert len(str(st.vsock_dir(deep))) < 60
    assert st.vsock_dir(deep) == st.vsock_dir(deep)  # every caller agrees
    assert len(str(st.runtime_dir(deep, "i-0-enc1") / "nsm.sock")) <= st.MAX_SOCKET_PATH
    assert st.vsock_dir(Path("/s")) == Path("/s/vsock")


def test_socket_directory_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    """A pre-created symlink in a shared temp dir must not redirect our sockets."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UsageError, match="not a directory owned"):
        st.ensure_private_dir(link)


def test_instance_id_is_stable(tmp_path: Path) -> None:
    first = st.instance_id(tmp_path)
    assert first.startswith("i-") and len(first) == 19
    assert st.instance_id(tmp_path) == first


def test_record_of_a_dead_launcher_is_cleaned_after_a_while(tmp_path: Path) -> None:
    store = st.EnclaveStore(tmp_path)
    starting = _record(state=st.STATE_STARTING, pid=0)
    store.save(starting)
    assert store.all() == [starting]  # still starting: kept
    old = time_ago(st.STALE_STARTING_AGE + 5)
    os.utime(store.enclave_dir(starting.enclave_id), (old, old))
    assert store.all() == []


def time_ago(seconds: float) -> float:
    import time

    return time.time() - seconds


def test_ended_enclaves_are_kept_bounded_with_their_logs(tmp_path: Path) -> None:
    store = st.EnclaveStore(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    ids = [f"i-0123456789abcdef0-enc{n:016x}" for n in range(st.MAX_ENDED + 5)]
    for n, enclave_id in enumerate(ids):
        (logs / f"{enclave_id}.log").write_text("console")
        store.record_end(_record(enclave_id=enclave_id), exit_status=n)
        stamp = 1_700_000_000 + n  # distinct times, whatever the file system's resolution
        os.utime(logs / f"{enclave_id}{st.ENDED_SUFFIX}", (stamp, stamp))
    store.record_end(_record(enclave_id=ids[-1]), exit_status=len(ids) - 1)  # purges
    kept = store.ended()
    assert len(kept) == st.MAX_ENDED and kept[0].enclave_id == ids[-1]
    assert not (logs / f"{ids[0]}.log").exists() and (logs / f"{ids[-1]}.log").exists()
    assert "exited with status" in kept[0].summary() and str(logs) in kept[0].summary()
    assert store.find_ended(name="app") == kept[0]


def test_describe_shows_what_a_debug_mode_enclave_attests() -> None:
    """Zero PCR0/1/2/8 in debug mode (nitro-cli shows the image's, aws-nitro-enclaves-cli#695)."""
    measured = {"HashAlgorithm": "Sha384 { ... }", "PCR0": "ab" * 48, "PCR8": "cd" * 48}
    described = _record(debug_mode=True, measurements=measured).describe()["Measurements"]
    assert described == {"HashAlgorithm": "Sha384 { ... }", "PCR0": "00" * 48, "PCR8": "00" * 48}
    assert _record(measurements=measured).describe()["Measurements"] == measured

"""The CLI end to end: ``atls get`` against the loop, and ``ca serve`` + ``atls proxy`` as processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from enclavekit.cli import cli
from enclavekit.nsm import EmulatedAwsPki, NsmEmulator
from enclavekit.nsm.server import serve_in_background
from tests.integration.atls.atls_loop import PCRS, UPSTREAM_BODY, Loop


def _policy(tmp: Path, pcrs: dict[int, bytes]) -> Path:
    path = tmp / f"policy-{len(list(tmp.iterdir()))}.json"
    path.write_text(json.dumps({"pcrs": {str(i): v.hex() for i, v in pcrs.items()}}))
    return path


def _get_args(loop: Loop, *extra: str) -> list[str]:
    return [
        "atls", "get", loop.url + "cli", "--ca-cert", str(loop.ca_root_path),
        "--root", str(loop.tmp / "nsm-root.pem"), *extra,
    ]  # fmt: skip


def test_atls_get_prints_the_body(loop: Loop) -> None:
    policy = _policy(loop.tmp, PCRS)
    r = CliRunner().invoke(cli, _get_args(loop, "--policy", str(policy), "--fresh"))
    assert r.exit_code == 0, r.output
    assert r.stdout_bytes == UPSTREAM_BODY
    assert "fresh document verified" in r.stderr
    assert loop.upstream_requests == ["/cli"]


def test_atls_get_json(loop: Loop) -> None:
    r = CliRunner().invoke(cli, _get_args(loop, "--json"))
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["status"] == 200
    assert report["pcrs"]["0"] == PCRS[0].hex()
    assert report["fresh"] is False


def test_atls_get_wrong_policy_exits_1_and_sends_nothing(loop: Loop) -> None:
    """`atls get` with a policy the enclave does not meet: exit 1, no request reaches the app."""
    policy = _policy(loop.tmp, {0: b"\x77" * 48})
    r = CliRunner().invoke(cli, _get_args(loop, "--policy", str(policy), "--fresh"))
    assert r.exit_code == 1
    assert "PCR0" in r.stderr
    assert r.stdout_bytes == b""
    assert loop.upstream_requests == []


def test_atls_get_without_nsm_root_exits_1(loop: Loop) -> None:
    """The emulator's PKI is not trusted unless --root names it."""
    r = CliRunner().invoke(cli, ["atls", "get", loop.url, "--ca-cert", str(loop.ca_root_path)])
    assert r.exit_code == 1
    assert loop.upstream_requests == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"process exited early: {proc.stderr.read() if proc.stderr else ''!r}"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"port {port} did not open")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_ca_serve_and_atls_proxy_processes(tmp_path: Path) -> None:
    """`enclavekit ca serve` and `enclavekit atls proxy` as real processes, checked with curl."""
    exe = [str(Path(sys.executable).parent / "enclavekit")]
    pki = EmulatedAwsPki.ephemeral()
    emulator = NsmEmulator(pcrs=PCRS, pki=pki)
    (tmp_path / "nsm-root.pem").write_bytes(pki.root_pem())
    (tmp_path / "ca-policy.yaml").write_text(
        "services:\n  web:\n    dns_names: [localhost]\n    pcrs:\n"
        + "      - {"
        + ", ".join(f"'{i}': '{v.hex()}'" for i, v in PCRS.items())
        + "}\n"
    )
    subprocess.run([*exe, "ca", "init", "--state-dir", str(tmp_path / "ca")], check=True)

    upstream = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(up_port := _free_port())],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    (tmp_path / "hello.txt").write_text("hello over attested TLS\n")
    ca_port, proxy_port = _free_port(), _free_port()
    procs = [upstream]
    try:
        with serve_in_background(emulator) as nsm_url:
            ca = subprocess.Popen(
                [*exe, "ca", "serve", "--listen", f"127.0.0.1:{ca_port}",
                 "--state-dir", str(tmp_path / "ca"), "--policy", str(tmp_path / "ca-policy.yaml"),
                 "--root", str(tmp_path / "nsm-root.pem")],
                stderr=subprocess.PIPE,
            )  # fmt: skip
            procs.append(ca)
            _wait_port(ca_port, ca)
            assert httpx.get(f"http://127.0.0.1:{ca_port}/openapi.json").status_code == 200
            proxy = subprocess.Popen(
                [*exe, "atls", "proxy", "--ca", f"http://127.0.0.1:{ca_port}", "--name", "web",
                 "--listen", f"127.0.0.1:{proxy_port}", "--upstream", f"127.0.0.1:{up_port}",
                 "--nsm", nsm_url],
                stderr=subprocess.PIPE, env=os.environ | {"ENCLAVEKIT_NSM": ""},
            )  # fmt: skip
            procs.append(proxy)
            _wait_port(up_port, upstream)
            _wait_port(proxy_port, proxy)
            out = subprocess.run(
                ["curl", "-sS", "--fail", "--cacert", str(tmp_path / "ca" / "ca-root.pem"),
                 f"https://localhost:{proxy_port}/hello.txt"],
                capture_output=True, timeout=30, check=True,
            )  # fmt: skip
            assert out.stdout == b"hello over attested TLS\n"
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for stream in (p.stderr, p.stdout):
                if stream is not None:
                    stream.close()


def test_atls_get_with_crl_url(loop: Loop) -> None:
    r = CliRunner().invoke(cli, _get_args(loop, "--crl", f"{loop.ca.url}/v1/crl"))
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, _get_args(loop, "--crl", str(loop.tmp / "missing.crl")))
    assert r.exit_code == 2


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_ca_serve_tls_and_mutual_attested_proxy_processes(tmp_path: Path) -> None:
    """`ca serve --tls`, `atls proxy --ca https://… --client-ca … --metrics-listen` as processes;
    `atls get --identity-ca` (an enclave client) gets through, curl without a certificate does not."""
    exe = [str(Path(sys.executable).parent / "enclavekit")]
    pki = EmulatedAwsPki.ephemeral()
    emulator = NsmEmulator(pcrs=PCRS, pki=pki)
    (tmp_path / "nsm-root.pem").write_bytes(pki.root_pem())
    pcrs = "{" + ", ".join(f"'{i}': '{v.hex()}'" for i, v in PCRS.items()) + "}"
    (tmp_path / "ca-policy.yaml").write_text(
        f"services:\n  web:\n    dns_names: [localhost]\n    pcrs: [{pcrs}]\n"
        f"  caller:\n    usage: client\n    pcrs: [{pcrs}]\n"
    )
    client_policy = _policy(tmp_path, PCRS)
    subprocess.run([*exe, "ca", "init", "--state-dir", str(tmp_path / "ca")], check=True)
    root = str(tmp_path / "ca" / "ca-root.pem")
    trust = ssl.create_default_context(cafile=root)
    upstream = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(up_port := _free_port())],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    (tmp_path / "hello.txt").write_text("hello over mutual attested TLS\n")
    ca_port, proxy_port, metrics_port = _free_port(), _free_port(), _free_port()
    procs = [upstream]
    try:
        with serve_in_background(emulator) as nsm_url:
            ca = subprocess.Popen(
                [*exe, "ca", "serve", "--listen", f"127.0.0.1:{ca_port}", "--tls",
                 "--tls-name", "localhost", "--state-dir", str(tmp_path / "ca"),
                 "--policy", str(tmp_path / "ca-policy.yaml"),
                 "--root", str(tmp_path / "nsm-root.pem"),
                 "--workers", "1"],  # the single-process /metrics (two workers: test_ca_workers.py)
                stderr=subprocess.PIPE,
            )  # fmt: skip
            procs.append(ca)
            _wait_port(ca_port, ca)
            ca_url = f"https://localhost:{ca_port}"
            assert httpx.get(f"{ca_url}/healthz", verify=trust).status_code == 200
            proxy = subprocess.Popen(
                [*exe, "atls", "proxy", "--ca", ca_url, "--ca-cert", root, "--name", "web",
                 "--listen", f"127.0.0.1:{proxy_port}", "--upstream", f"127.0.0.1:{up_port}",
                 "--nsm", nsm_url, "--client-ca", root, "--client-policy", client_policy,
                 "--root", str(tmp_path / "nsm-root.pem"),
                 "--metrics-listen", f"127.0.0.1:{metrics_port}"],
                stderr=subprocess.PIPE, env=os.environ | {"ENCLAVEKIT_NSM": ""},
            )  # fmt: skip
            procs.append(proxy)
            _wait_port(up_port, upstream)
            _wait_port(proxy_port, proxy)
            url = f"https://localhost:{proxy_port}/hello.txt"
            anonymous = subprocess.run(
                ["curl", "-sS", "--fail", "--cacert", root, url], capture_output=True, timeout=30
            )
            assert anonymous.returncode != 0
            r = CliRunner().invoke(
                cli,
                ["atls", "get", url, "--ca-cert", root, "--root", str(tmp_path / "nsm-root.pem"),
                 "--policy", client_policy, "--fresh", "--identity-ca", ca_url,
                 "--identity-name", "caller", "--identity-ca-cert", root, "--nsm", nsm_url],
            )  # fmt: skip
            assert r.exit_code == 0, r.output
            assert r.stdout_bytes == b"hello over mutual attested TLS\n"
            metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
            assert 'enclavekit_atls_client_refusals_total{reason="no_certificate"} 1.0' in metrics
            ca_metrics = httpx.get(f"{ca_url}/metrics", verify=trust).text
            assert "enclavekit_ca_issuances_total 2.0" in ca_metrics
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for stream in (p.stderr, p.stdout):
                if stream is not None:
                    stream.close()


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # peak resident set size
            return int(line.split()[1])
    raise AssertionError("no VmHWM")  # pragma: no cover


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_attack_ca_serve_buffers_a_chunked_body_whole(tmp_path: Path) -> None:
    """`enclavekit ca serve` as a process: a chunked 8 MiB body is refused with 413 before it is
    all sent, without input in the answer and without the server's memory growing with the body;
    its state directory is 0700 and its database files 0600."""
    from tests.unit.atls.test_hostile_clients import MARKER, _stream_chunked

    exe = [str(Path(sys.executable).parent / "enclavekit")]
    (tmp_path / "ca-policy.yaml").write_text(
        "services:\n  web:\n    dns_names: [localhost]\n    pcrs:\n      - {'0': '"
        + "00" * 48
        + "'}\n"
    )
    state = tmp_path / "ca"
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    subprocess.run(
        ["sh", "-c", 'umask 022 && exec "$@"', "sh", *exe, "ca", "init", "--state-dir", str(state)],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    port = _free_port()
    ca = subprocess.Popen(
        ["sh", "-c", 'umask 022 && exec "$@"', "sh", *exe, "ca", "serve",
         "--listen", f"127.0.0.1:{port}", "--state-dir", str(state),
         "--policy", str(tmp_path / "ca-policy.yaml"), "--audit-retention-days", "7",
         "--workers", "1"],  # the serving process itself: its peak RSS is measured
        stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        _wait_port(port, ca)
        assert httpx.post(f"http://127.0.0.1:{port}/v1/challenges").status_code == 201
        before = _peak_rss_kib(ca.pid)
        total = 8 * 1024 * 1024
        sent, response = _stream_chunked(port, "/v1/certificates", total)
        after = _peak_rss_kib(ca.pid)
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert sent < total // 2
        assert MARKER not in response
        assert after - before < 8 * 1024, (before, after)
        assert os.stat(state).st_mode & 0o777 == 0o700
        modes = {p.name: p.stat().st_mode & 0o777 for p in state.glob("ca.sqlite3*")}
        assert "ca.sqlite3" in modes
        assert set(modes.values()) == {0o600}, modes
    finally:
        ca.send_signal(signal.SIGINT)
        try:
            ca.wait(timeout=10)
        except subprocess.TimeoutExpired:
            ca.kill()
            ca.wait()
        assert ca.stderr is not None
        ca.stderr.close()

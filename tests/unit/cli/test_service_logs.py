"""`ca serve` and `atls proxy` log start, issuance, refusal (with its reason), renewal and stop on
stderr, one line each; `--log-format json` makes each line one JSON object."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

from enclavekit.nsm import EmulatedAwsPki, NsmEmulator
from enclavekit.nsm.server import serve_in_background
from tests.unit.cli.conftest import EXE, run, wait_for

PCRS = {0: bytes([1]) * 48, 1: bytes([2]) * 48, 2: bytes([3]) * 48}


def _events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _has(log: Path, name: str) -> bool:
    return any(e["event"] == name for e in _events(log))


def _policy(path: Path, validity: int) -> None:
    pcrs = ", ".join(f"'{i}': '{v.hex()}'" for i, v in PCRS.items())
    path.write_text(
        "services:\n  web:\n    dns_names: [localhost]\n"
        f"    certificate_validity_seconds: {validity}\n    pcrs:\n      - {{{pcrs}}}\n"
    )


def test_attack_ca_and_proxy_issue_refuse_and_renew_silently(tmp_path: Path) -> None:
    pki = EmulatedAwsPki.ephemeral()
    (tmp_path / "nsm-root.pem").write_bytes(pki.root_pem())
    _policy(tmp_path / "ca-policy.yaml", validity=3)  # renewal after ~2 s
    assert run("ca", "init", "--state-dir", str(tmp_path / "ca")).returncode == 0
    ca_log, proxy_log, refused_log = (
        tmp_path / "ca.log",
        tmp_path / "proxy.log",
        tmp_path / "refused.log",
    )
    procs: list[subprocess.Popen[bytes]] = []
    with serve_in_background(NsmEmulator(pcrs=PCRS, pki=pki)) as nsm_url:
        try:
            with ca_log.open("wb") as err:
                procs.append(
                    subprocess.Popen(
                        [
                            *EXE,
                            "ca",
                            "serve",
                            "--log-format",
                            "json",
                            "--listen",
                            "127.0.0.1:0",
                            "--state-dir",
                            str(tmp_path / "ca"),
                            "--policy",
                            str(tmp_path / "ca-policy.yaml"),
                            "--root",
                            str(tmp_path / "nsm-root.pem"),
                        ],
                        stderr=err,
                    )
                )
            wait_for(
                lambda: _has(ca_log, "start") or procs[0].poll() is not None, "the CA to start"
            )
            ca_url = next(e for e in _events(ca_log) if e["event"] == "start")["listen"]
            proxy_args = [
                "--ca",
                ca_url,
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "127.0.0.1:9",
                "--nsm",
                nsm_url,
            ]
            with proxy_log.open("wb") as err:
                procs.append(
                    subprocess.Popen(
                        [
                            *EXE,
                            "atls",
                            "proxy",
                            "--log-format",
                            "json",
                            "--name",
                            "web",
                            *proxy_args,
                        ],
                        stderr=err,
                    )
                )
            wait_for(
                lambda: _has(proxy_log, "renewed") or procs[1].poll() is not None, "a renewal", 60
            )
            with refused_log.open("wb") as err:
                refused = subprocess.run(
                    [*EXE, "atls", "proxy", "--name", "not-in-policy", *proxy_args],
                    stderr=err,
                    timeout=60,
                )
            assert refused.returncode != 0
            wait_for(lambda: _has(ca_log, "refused"), "the CA's refusal line")
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=20)
    ca_events, proxy_events = _events(ca_log), _events(proxy_log)  # every line parses as JSON
    ca_names = [e["event"] for e in ca_events if e["event"] not in ("warning", "signal")]
    assert ca_names[0] == "start" and ca_names[-1] == "stop", ca_names
    assert ca_names.count("issued") >= 2  # the first certificate and its renewal
    refusal = next(e for e in ca_events if e["event"] == "refused")
    assert refusal["service"] == "not-in-policy" and "service" in refusal["reason"]
    issued = next(e for e in ca_events if e["event"] == "issued")
    assert issued["service"] == "web" and issued["serial"] and issued["not_after"]
    proxy_names = [e["event"] for e in proxy_events if e["event"] not in ("warning", "signal")]
    assert proxy_names[:2] == ["obtained", "start"] and proxy_names[-1] == "stop", proxy_names
    assert "renewed" in proxy_names
    assert all(e["event"] != "log" for e in ca_events + proxy_events)  # each line is a known event
    assert all(
        {"time", "level", "logger", "event", "message"} <= set(e) for e in ca_events + proxy_events
    )


def test_text_log_format_is_one_line_per_event(tmp_path: Path) -> None:
    _policy(tmp_path / "ca-policy.yaml", validity=3600)
    assert run("ca", "init", "--state-dir", str(tmp_path / "ca")).returncode == 0
    log = tmp_path / "ca.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [
                *EXE,
                "ca",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
                str(tmp_path / "ca"),
                "--policy",
                str(tmp_path / "ca-policy.yaml"),
            ],
            stderr=err,
        )
    wait_for(lambda: "listening on" in log.read_text() or proc.poll() is not None, "the CA")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    lines = log.read_text().splitlines()
    assert any(" info start: attestation CA listening on http://127.0.0.1:" in x for x in lines), (
        lines
    )
    assert any(" info stop: attestation CA on http://127.0.0.1:" in x for x in lines), lines

"""`enclavekit --help` and `enclavekit verify --help` load no command module they do not show.

Checked by which modules are present in ``sys.modules`` of a fresh interpreter, never by timing
(benchmarks/bench_startup.py measures the time).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import click
import pytest

from enclavekit.cli import _COMMANDS, cli

HEAVY = ("cryptography", "fastapi", "uvicorn", "httpx", "rich", "yaml", "cbor2", "asn1crypto")

PROBE = """
import json, sys
import enclavekit.cli as c
argv = json.loads(sys.argv[1])
if argv:
    try:
        c.cli.main(argv, prog_name="enclavekit")
    except SystemExit:
        pass
loaded = sorted({m.split(".")[0] for m in sys.modules} | {m for m in sys.modules if m.startswith("enclavekit")})
sys.stderr.write(json.dumps(loaded))
"""


def _loaded_after(argv: list[str]) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return set(json.loads(done.stderr))


@pytest.mark.parametrize("argv", [[], ["--help"], ["verify", "--help"]])
def test_attack_help_loads_every_command_module_up_front(argv: list[str]) -> None:
    loaded = _loaded_after(argv)
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    others = {m for m in loaded if m.startswith("enclavekit.cli.")} - {
        "enclavekit.cli._common",
        "enclavekit.cli._render",
        "enclavekit.cli._files",
        "enclavekit.cli.verify",
    }
    assert not others, sorted(others)
    if not argv:
        assert "enclavekit.cli.verify" not in loaded


def test_listing_short_help_matches_each_commands_docstring() -> None:
    """The lazy listing's text is a copy; this keeps it equal to what the command itself says."""
    ctx = click.Context(cli)
    for name, (module, short_help) in _COMMANDS.items():
        collector = click.Group()
        importlib.import_module(module).register(collector)
        command = collector.commands[name]
        assert command.get_short_help_str(limit=45) == short_help, name
        assert cli.get_command(ctx, name) is not None


def test_every_registered_command_is_listed() -> None:
    modules = {module for module, _ in _COMMANDS.values()}
    for module in modules:
        collector = click.Group()
        importlib.import_module(module).register(collector)
        assert set(collector.commands) <= set(_COMMANDS), module


MISSING_EXTRA = """
import sys
import click
import enclavekit.cli as c

@click.command("needs-kms")
def needs_kms() -> None:
    raise ModuleNotFoundError("No module named 'botocore'", name="botocore")

c.cli.add_command(needs_kms)
c.cli.main(["needs-kms"], prog_name="enclavekit")
"""


def test_attack_missing_optional_dependency_is_a_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-c", MISSING_EXTRA], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "pip install 'enclavekit[kms]'" in done.stderr

"""Shell completion (documented in docs/index.md): the scripts generate, and completing answers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENCLAVEKIT = str(Path(sys.executable).parent / "enclavekit")


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("_ENCLAVEKIT", "COMP_"))}
    full.update(env)
    return subprocess.run(
        [ENCLAVEKIT], env=full, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("shell", "marker"),
    [
        ("bash", "complete -o nosort -F _enclavekit_completion enclavekit"),
        ("zsh", "compdef _enclavekit_completion enclavekit"),
        ("fish", "complete --no-files --command enclavekit"),
    ],
)
def test_completion_script_generates(shell: str, marker: str) -> None:
    result = _run({"_ENCLAVEKIT_COMPLETE": f"{shell}_source"})
    assert result.returncode == 0, result.stderr
    assert marker in result.stdout
    assert result.stderr == ""


def test_bash_completes_a_command_and_its_options() -> None:
    commands = _run(
        {"_ENCLAVEKIT_COMPLETE": "bash_complete", "COMP_WORDS": "enclavekit ver", "COMP_CWORD": "1"}
    )
    assert commands.returncode == 0, commands.stderr
    assert "plain,verify" in commands.stdout.splitlines()
    options = _run(
        {
            "_ENCLAVEKIT_COMPLETE": "bash_complete",
            "COMP_WORDS": "enclavekit verify --no",
            "COMP_CWORD": "2",
        }
    )
    assert "plain,--nonce" in options.stdout.splitlines()

"""``enclavekit demo`` end to end: every step passes and the tampered image is refused."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from enclavekit.demo import run_demo


def test_demo_runs_every_step_and_refuses_the_tampered_image(tmp_path: Path) -> None:
    buffer = io.StringIO()
    result = run_demo(
        workdir=tmp_path / "demo",
        console=Console(file=buffer, width=200, highlight=False),
        isolation="process",
    )
    text = buffer.getvalue()
    assert result.ok, text
    assert "REFUSED: PCR0 and PCR2 do not match the build" in text
    assert "enclave says: 'Hello, demo client!" in text
    assert result.seconds < 60
    assert [s["step"] for s in result.steps][-1].startswith("Client verifies the tampered")
    assert not list((tmp_path / "demo" / "state" / "enclaves").iterdir())  # all terminated


def test_demo_command_exits_0_and_prints_the_refusal(tmp_path: Path) -> None:
    """The README's first command, as a user runs it (default isolation for this user)."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "enclavekit"), "demo", "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "REFUSED" in proc.stderr
    assert "All 8 steps behaved as expected" in proc.stderr

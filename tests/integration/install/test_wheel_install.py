"""A plain ``pip install enclavekit`` (no extras): the wheel, built from this checkout, installed into a fresh
venv; then ``enclavekit demo`` and every command's ``--help`` run from that venv.

The install tries uv's cache first (``--offline``) and reaches PyPI only for what the cache lacks, so a
machine that ran ``make venv`` installs in about a second. Versions are resolved afresh, as a user's
``pip install`` resolves them, not taken from uv.lock.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ~25 s: a wheel build, a fresh venv, the demo and ~35 --help runs

ROOT = Path(__file__).resolve().parents[3]

WALK = """
import json, click
from enclavekit.cli import cli
paths = []
def walk(command, path):
    paths.append(path)
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            walk(command.get_command(ctx, name), [*path, name])
walk(cli, [])
print(json.dumps(paths))
"""


def _uv() -> str:
    local = ROOT / ".tools" / "bin" / "uv"
    found = str(local) if local.exists() else shutil.which("uv")
    if found is None:
        pytest.skip("uv is not installed (make venv bootstraps it into .tools/)")
    return found


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kwargs)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    uv = _uv()
    base = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    built = _run(
        [uv, "build", "--offline", "--wheel", "--out-dir", str(base / "dist"), str(ROOT)], env=env
    )
    if built.returncode != 0:  # the build backend (hatchling) is not in uv's cache yet
        built = _run([uv, "build", "--wheel", "--out-dir", str(base / "dist"), str(ROOT)], env=env)
    assert built.returncode == 0, built.stderr
    (wheel,) = (base / "dist").glob("enclavekit-*.whl")
    venv = base / "venv"
    made = _run([uv, "venv", "--quiet", str(venv), "--python", sys.executable], env=env)
    assert made.returncode == 0, made.stderr
    install = [
        uv,
        "pip",
        "install",
        "--quiet",
        "--python",
        str(venv / "bin" / "python"),
        str(wheel),
    ]
    done = _run([*install, "--offline"], env=env)
    if done.returncode != 0:
        done = _run(install, env=env)
    assert done.returncode == 0, done.stderr
    return venv


def test_plain_install_has_no_extras(plain_venv: Path) -> None:
    probe = (
        "import importlib.util as u; print([m for m in ('psycopg', 'botocore') if u.find_spec(m)])"
    )
    done = _run([str(plain_venv / "bin" / "python"), "-c", probe])
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_attack_plain_install_demo_crashes_on_a_missing_extra(
    plain_venv: Path, tmp_path: Path
) -> None:
    done = _run(
        [
            str(plain_venv / "bin" / "enclavekit"),
            "demo",
            "--json",
            "--workdir",
            str(tmp_path / "d"),
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert json.loads(done.stdout)["ok"] is True


def test_every_help_runs_from_a_plain_install(plain_venv: Path, tmp_path: Path) -> None:
    walked = _run([str(plain_venv / "bin" / "python"), "-c", WALK], cwd=tmp_path)
    assert walked.returncode == 0, walked.stderr
    paths = json.loads(walked.stdout)
    assert len(paths) > 20
    for path in paths:
        done = _run([str(plain_venv / "bin" / "enclavekit"), *path, "--help"], cwd=tmp_path)
        assert done.returncode == 0, (path, done.stderr)
        assert "Usage: enclavekit" in done.stdout, path


def test_a_command_needing_an_extra_names_the_pip_line(plain_venv: Path, tmp_path: Path) -> None:
    exe = str(plain_venv / "bin" / "enclavekit")
    assert _run([exe, "ca", "init", "--state-dir", str(tmp_path / "ca")]).returncode == 0
    (tmp_path / "policy.yaml").write_text(
        "services:\n  web:\n    dns_names: [localhost]\n    pcrs:\n      - {'0': '"
        + "00" * 48
        + "'}\n"
    )
    done = _run(
        [
            exe, "ca", "serve", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "ca"),
            "--policy", str(tmp_path / "policy.yaml"), "--database", "postgresql://127.0.0.1/test",
        ]
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "pip install 'enclavekit[postgres]'" in done.stderr
    assert "Traceback" not in done.stderr

"""Run the documentation's examples (README.md and docs/*.md) as tests, with Sybil.

What is executed:

* every fenced ``python`` block (and ``>>>`` doctest blocks), in one namespace per page, in the page's own
  temporary working directory, with the files and names the page's prose takes for granted (``doc.cbor``,
  ``app.eif``, ``pcr0``, …) provided by that page's fixture below;
* every ``console`` block. A line ``$ enclavekit …`` (or ``$ export …``) is a command: it runs with bash in the
  page's working directory and must exit with status 0, or with the status named in its trailing comment
  (``# … exit 1``); a trailing ``&`` starts it in the background until the page ends (its "listening on"
  announcement is awaited). Lines after a command are its documented output: when it is JSON-shaped, every
  key it names must occur in the command's JSON output (values may be elided with ``…``). A command written as a
  synopsis (``[--flag]``, ``A | B``, ``…``, ``(…)``), and every line of a console block without ``$``
  prompts that starts with ``enclavekit`` or ``python -m enclavekit.vm``, is checked against the CLI instead:
  the command path must exist and every ``-x`` / ``--flag`` it names must be one of that command's options.
  Of other programs only ``mkdir`` runs (``docker``, ``make``, ``pip`` do not); the page's fixture provides what
  they would make. ``HOME`` is the page's directory, so ``~/…`` stays inside it.

``<!-- skip: next "reason" -->`` before a block skips it; it is for examples that need Nitro hardware, QEMU or
AWS, and the reason says which.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
from sybil import Example, Sybil
from sybil.evaluators.python import PythonEvaluator
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests" / "assets"
BIN = Path(sys.executable).parent
COMMAND_TIMEOUT = 120.0
PAGE = "__enclavekit_docs_page__"


# ------------------------------------------------------------------------------------ the page's state


class Page:
    """One documentation page's working directory, environment and background processes."""

    def __init__(self, doc_path: Path) -> None:
        self.doc_path = doc_path
        self.dir = Path(tempfile.mkdtemp(prefix=f"ek-docs-{doc_path.stem}-"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENCLAVEKIT_")}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env["ENCLAVEKIT_STATE_DIR"] = str(self.dir / "state")
        env["NO_COLOR"] = "1"
        env["HOME"] = str(self.dir)  # `~/…` in an example lands in the page's directory
        self.env = env
        self.background: list[subprocess.Popen[bytes]] = []
        self.cleanups: list[Callable[[], None]] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The page's working directory and environment, for examples run in this process."""
        old_cwd, old_env = os.getcwd(), dict(os.environ)
        os.chdir(self.dir)
        os.environ.clear()
        os.environ.update(self.env)
        try:
            yield
        finally:
            os.chdir(old_cwd)
            os.environ.clear()
            os.environ.update(old_env)

    def close(self) -> None:
        for proc in reversed(self.background):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for cleanup in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)


def page_for(example: Example) -> Page:
    """The page of this example, created (with its fixture) at its first example."""
    namespace = example.namespace
    page = namespace.get(PAGE)
    if page is None:
        page = Page(Path(example.path))
        namespace[PAGE] = page
        fixture = FIXTURES.get(page.doc_path.name)
        if fixture is not None:
            with page.active():
                fixture(page, namespace)
    assert isinstance(page, Page)
    return page


def teardown(namespace: dict[str, Any]) -> None:
    page = namespace.get(PAGE)
    if isinstance(page, Page):
        page.close()


# ------------------------------------------------------------------------------------ fixtures per page


def _pcrs_of(document: bytes) -> dict[int, bytes]:
    from enclavekit.attestation.document import AttestationDocument

    return dict(AttestationDocument.from_cbor(document).pcrs)


def fixture_verify(page: Page, ns: dict[str, Any]) -> None:
    """verify.md: a genuine AWS document, its policy, and an emulated document with its root."""
    from enclavekit.attestation.document import AttestationDocument
    from enclavekit.nsm import EmulatedAwsPki, Nsm, NsmEmulator

    real = (ASSETS / "attestation" / "real" / "marlin-2024-08-prod.cbor").read_bytes()
    (page.dir / "doc.cbor").write_bytes(real)
    (page.dir / "doc.b64").write_text(base64.b64encode(real).decode() + "\n")
    pcrs = _pcrs_of(real)
    measurements = {f"PCR{i}": pcrs[i].hex() for i in (0, 1, 2)}
    build = {"Measurements": {"HashAlgorithm": "Sha384 { ... }", **measurements}}
    (page.dir / "build.json").write_text(json.dumps(build, indent=2) + "\n")

    pki = EmulatedAwsPki.load_or_create(page.dir / "nsm-state")
    emulator = NsmEmulator(pcrs={0: pcrs[0], 1: pcrs[1], 2: pcrs[2]}, debug_mode=False, pki=pki)
    (page.dir / "emulated.cbor").write_bytes(
        Nsm.in_process(emulator).attestation(nonce=bytes.fromhex("9f3a"))
    )
    shutil.copy(page.dir / "nsm-state" / "root.pem", page.dir / "emulator-root.pem")

    # The library example: a genuine production document that carries a nonce.
    raw = (ASSETS / "attestation" / "real" / "eternis-2024-07-prod.cbor").read_bytes()
    parsed = AttestationDocument.from_cbor(raw)
    ns.update(
        raw_document=raw,
        documents=[raw, real],
        pcr0=parsed.pcrs[0],
        pcr1=parsed.pcrs[1],
        pcr2=parsed.pcrs[2],
        challenge=parsed.nonce,
        received_at=parsed.timestamp + timedelta(seconds=2),
    )


def fixture_eif(page: Page, ns: dict[str, Any]) -> None:
    """eif.md: a kernel, two ramdisks, a signing certificate and key, an unsigned EIF."""
    from enclavekit.eif.metadata import BuildInfo, IdentityInfo
    from enclavekit.eif.writer import write_eif
    from tests.unit.build_enclave.factory import kernel_bytes, write_signing_files

    (page.dir / "bzImage").write_bytes(kernel_bytes())
    (page.dir / "bootstrap.cpio").write_bytes(b"070701" + b"0" * 104 + b"bootstrap stand-in")
    (page.dir / "customer.cpio").write_bytes(b"070701" + b"0" * 104 + b"customer stand-in")
    write_signing_files(page.dir)
    write_eif(
        page.dir / "unsigned.eif",
        kernel=kernel_bytes(),
        cmdline="console=ttyS0",
        ramdisks=[b"bootstrap", b"customer"],
        metadata=IdentityInfo("unsigned", "1.0", BuildInfo(build_time="2026-01-01T00:00:00+00:00")),
    )


def fixture_build(page: Page, ns: dict[str, Any]) -> None:
    """build.md: what ``docker save hello:v1 -o hello.tar`` would write, and nitro-cli's blobs."""
    from enclavekit.demo import write_blobs
    from tests.unit.build_enclave.factory import base_layer, docker_archive

    docker_archive(page.dir / "hello.tar", [base_layer()])
    write_blobs(page.dir / "blobs")


def fixture_eif_with_kms(page: Page, ns: dict[str, Any]) -> None:
    """eif.md: as :func:`fixture_eif`, plus moto's KMS (server mode) with an ECC_NIST_P384 signing key,
    ``$KMS_KEY_ARN`` naming it and ``kms-cert.pem`` holding its public key (what ``aws kms`` and a CA
    would give)."""
    fixture_eif(page, ns)
    import botocore.session
    from moto.server import ThreadedMotoServer

    from tests.unit.kms.test_kms_signing import _certificate_for

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    page.cleanups.append(server.stop)
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    page.env.update(
        {
            "AWS_ACCESS_KEY_ID": "docs",
            "AWS_SECRET_ACCESS_KEY": "docs",
            "AWS_REGION": "eu-central-1",
            "AWS_ENDPOINT_URL_KMS": endpoint,
        }
    )
    kms = botocore.session.get_session().create_client(
        "kms",
        region_name="eu-central-1",
        endpoint_url=endpoint,
        aws_access_key_id="docs",
        aws_secret_access_key="docs",
    )
    arn = kms.create_key(KeySpec="ECC_NIST_P384", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["Arn"]
    alias = f"alias/eif-signer-{os.getpid()}-{time.monotonic_ns()}"  # moto's state is per process
    kms.create_alias(AliasName=alias, TargetKeyId=arn)
    page.env["KMS_KEY_ARN"] = arn
    page.env["KMS_ALIAS_ARN"] = arn.split(":key/")[0] + ":" + alias
    _certificate_for(endpoint, arn, page.dir / "kms-cert.pem")


def fixture_registry(page: Page, ns: dict[str, Any]) -> None:
    """registry.md: docker-registry instances on 127.0.0.1 (``$REGISTRY`` open, ``$PRIVATE_REGISTRY``
    with htpasswd user ``ci``/``ci-password``) holding ``hello:v1`` pushed by skopeo; nitro-cli's
    blobs; a blob cache inside the page's directory."""
    import bcrypt

    from enclavekit.demo import write_blobs
    from tests.unit.registry.harness import (
        app_layers,
        require_tools,
        skopeo_push,
        start_registry,
        write_layout,
    )

    require_tools()
    write_blobs(page.dir / "blobs")
    storage = page.dir / ".registry-storage"
    open_registry = start_registry(page.dir / ".registry-open", storage)
    page.cleanups.append(open_registry.stop)
    users = page.dir / ".htpasswd"
    users.write_text(f"ci:{bcrypt.hashpw(b'ci-password', bcrypt.gensalt(rounds=4)).decode()}\n")
    private = start_registry(
        page.dir / ".registry-private",
        storage,
        extra=f"auth:\n  htpasswd:\n    realm: docs\n    path: {users}\n",
    )
    page.cleanups.append(private.stop)
    layout = write_layout(
        page.dir / ".layout",
        {"amd64": app_layers("hello"), "arm64": app_layers("hello-arm64")},
        ref="v1",
    )
    skopeo_push(f"oci:{layout}:v1", open_registry.host, "hello:v1", all_images=True)
    page.env.update(
        {
            "REGISTRY": open_registry.host,
            "PRIVATE_REGISTRY": private.host,
            "XDG_CACHE_HOME": str(page.dir / ".cache"),
            "SOURCE_DATE_EPOCH": "1700000000",
        }
    )


def fixture_nsm(page: Page, ns: dict[str, Any]) -> None:
    """nsm.md: ``Nsm.open()`` reaches an emulator served in the background (``ENCLAVEKIT_NSM``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from enclavekit.nsm import EmulatedAwsPki, NsmEmulator
    from enclavekit.nsm.server import serve_in_background

    pcr0, pcr1, pcr2 = (bytes([i]) * 48 for i in (1, 2, 3))
    pki = EmulatedAwsPki.load_or_create(page.dir / "served-nsm-state")
    served = serve_in_background(NsmEmulator(pcrs={0: pcr0, 1: pcr1, 2: pcr2}, pki=pki))
    url = served.__enter__()
    page.cleanups.append(lambda: served.__exit__(None, None, None))
    page.env["ENCLAVEKIT_NSM"] = str(url)
    key = ec.generate_private_key(ec.SECP384R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ns.update(pcr0=pcr0, pcr1=pcr1, pcr2=pcr2, spki_der=spki)


APP = """\
import sys
from enclavekit.transport import listen

server = listen("vsock://ANY:5000")
print("hello from the enclave: listening on vsock port 5000", flush=True)
while True:
    conn, _ = server.accept()
    conn.sendall(b"hello\\n")
    conn.close()
"""


def fixture_run(page: Page, ns: dict[str, Any]) -> None:
    """run.md: ``app.eif``, an application that prints a console line and serves vsock port 5000."""
    from enclavekit.demo import write_blobs
    from enclavekit.eif.build import build_enclave
    from enclavekit.eif.image import RootfsDir

    rootfs = page.dir / "image"
    rootfs.mkdir()
    (rootfs / "app.py").write_text(APP)
    build_enclave(
        RootfsDir(rootfs),
        page.dir / "app.eif",
        blobs_dir=write_blobs(page.dir / "blobs"),
        name="app",
        cmd=("/bin/sh", "-c", 'exec "$ENCLAVEKIT_PYTHON" app.py'),
        env=("PATH=/usr/bin:/bin",),
        source_date_epoch="0",
    )

    run_json = {"eif_path": "app.eif", "memory_mib": 512, "cpu_count": 1, "enclave_name": "app"}
    (page.dir / "run.json").write_text(json.dumps(run_json) + "\n")

    def terminate_all() -> None:
        subprocess.run(
            [
                str(BIN / "enclavekit"),
                "terminate-enclave",
                "--all",
                "--state-dir",
                str(page.dir / "state"),
            ],
            env=page.env,
            capture_output=True,
            timeout=30,
            check=False,
        )

    page.cleanups.append(terminate_all)


FIXTURES: dict[str, Callable[[Page, dict[str, Any]], None]] = {
    "verify.md": fixture_verify,
    "eif.md": fixture_eif_with_kms,
    "registry.md": fixture_registry,
    "build.md": fixture_build,
    "nsm.md": fixture_nsm,
    "run.md": fixture_run,
    "kms.md": fixture_nsm,
}


# ------------------------------------------------------------------------------------ python blocks

_python = PythonEvaluator()


def evaluate_python(example: Example) -> str | None:
    """Run the block; a failure is reported as the example's traceback (Sybil shows the text)."""
    try:
        page = page_for(example)
        with page.active():
            return _python(example)
    except Exception:
        return traceback.format_exc()


def _python_or_doctest_parser() -> PythonCodeBlockParser:
    parser = PythonCodeBlockParser()
    parser.codeblock_parser = CodeBlockParser("python", evaluate_python)
    return parser


# ------------------------------------------------------------------------------------ console blocks

_SYNOPSIS = re.compile(r"\[|\]|\s\|\s|…|\(--|\|\s*--")
_FLAG = re.compile(r"(?<![\w/=.:-])(--?[A-Za-z][\w-]*)")
_EXIT = re.compile(r"\bexit\s+(\d)\b")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
RUN_PROGRAMS = {"enclavekit", "mkdir"}
_JSON_KEY = re.compile(r'"([A-Za-z_][\w ]*)"\s*:')


def _split_comment(line: str) -> tuple[str, str]:
    """``cmd  # comment`` → (cmd, comment); a ``#`` inside quotes or a word is not a comment."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def _console_items(source: str) -> Iterable[tuple[str, str, list[str]]]:
    """(kind, command, output lines) for each command of a console block; kind is run|synopsis."""
    lines = source.splitlines()
    if not any(line.startswith("$ ") for line in lines):
        current: list[str] = []
        for line in lines + [""]:
            if line.startswith(("enclavekit ", "python -m enclavekit.vm ")):
                if current:
                    yield "synopsis", " ".join(current), []
                current = [line]
            elif current and line.startswith(" ") and line.strip():
                current.append(line.strip())
            else:
                if current:
                    yield "synopsis", " ".join(current), []
                current = []
        return
    command: str | None = None
    output: list[str] = []
    for line in lines + ["$ "]:
        if line.startswith("$ "):
            if command is not None:
                kind = "synopsis" if _SYNOPSIS.search(_split_comment(command)[0]) else "run"
                if kind == "synopsis":
                    # a synopsis continues on indented lines; what follows them is sample output
                    extra = [
                        o.strip() for o in output if o.startswith(" ") and ("[" in o or "--" in o)
                    ]
                    command = " ".join([command, *extra])
                yield kind, command, output
            command, output = line[2:], []
        elif command is not None:
            output.append(line)


def _resolve(words: list[str]) -> tuple[click.Command, list[str]]:
    """The click command a synopsis names, and the words after its name."""
    if words[:3] == ["python", "-m", "enclavekit.vm"]:
        from enclavekit.vm.commands import main as vm_main

        command: click.Command = vm_main
        rest = words[3:]
    elif words[:1] == ["enclavekit"]:
        from enclavekit.cli import cli

        command, rest = cli, words[1:]
    else:
        raise AssertionError(f"not an enclavekit command: {' '.join(words)}")
    while isinstance(command, click.Group) and rest:
        sub = command.get_command(click.Context(command), rest[0])
        if sub is None:
            break
        command, rest = sub, rest[1:]
    return command, rest


def check_synopsis(text: str) -> None:
    command_text, _ = _split_comment(text)
    command, rest = _resolve(command_text.split())
    if isinstance(command, click.Group):
        raise AssertionError(f"{text!r}: names the group {command.name!r}, not one of its commands")
    known: set[str] = set()
    for param in command.params:
        if isinstance(param, click.Option):
            known.update(param.opts)
            known.update(param.secondary_opts)
    known.update(["-h", "--help"])
    unknown = sorted({f for f in _FLAG.findall(" ".join(rest)) if f not in known})
    if unknown:
        raise AssertionError(
            f"documented synopsis {text!r} names option(s) {', '.join(unknown)} that "
            f"{command.name!r} does not have (it has: {', '.join(sorted(known))})"
        )


def _json_keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        keys = set(value)
        for v in value.values():
            keys |= _json_keys(v)
        return keys
    if isinstance(value, list):
        return set().union(*(_json_keys(v) for v in value)) if value else set()
    return set()


def _wait_listening(proc: subprocess.Popen[bytes], log: Path, command: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "listening on" in text:
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"background command {command!r} exited {proc.returncode}:\n{text}"
            )
        time.sleep(0.05)
    raise AssertionError(f"background command {command!r} did not announce 'listening on' in 30 s")


def run_command(page: Page, command: str, output: list[str]) -> None:
    text, comment = _split_comment(command)
    match = _EXIT.search(comment)
    expected = int(match.group(1)) if match else 0
    words = text.split()
    program = next((w for w in words if not _ASSIGNMENT.match(w)), "")
    if words[0] == "export":
        name, _, value = text[len("export ") :].partition("=")
        page.env[name] = subprocess.run(
            ["bash", "-c", f"printf %s {value}"],
            cwd=page.dir,
            env=page.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return
    if program not in RUN_PROGRAMS:
        return  # another program (docker, make, pip): the page's fixture provides its result
    if text.endswith("&"):
        log = page.dir / f".background-{len(page.background)}.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                ["bash", "-c", f"exec {text[:-1]}"],
                cwd=page.dir,
                env=page.env,
                stdout=subprocess.DEVNULL,
                stderr=sink,
            )
        page.background.append(proc)
        _wait_listening(proc, log, text)
        return
    result = subprocess.run(
        ["bash", "-c", text],
        cwd=page.dir,
        env=page.env,
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    stdout = result.stdout.decode(errors="replace")
    stderr = result.stderr.decode(errors="replace")
    if result.returncode != expected:
        raise AssertionError(
            f"documented command {text!r} exited {result.returncode}, the docs say {expected}\n"
            f"--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-4000:]}"
        )
    if "Traceback (most recent call last)" in stderr:
        raise AssertionError(f"documented command {text!r} printed a traceback:\n{stderr[-4000:]}")
    documented = "\n".join(output)
    keys = set(_JSON_KEY.findall(documented))
    if keys and ">" not in text:
        try:
            actual = json.loads(stdout)
        except ValueError as exc:
            raise AssertionError(
                f"{text!r}: stdout is not one JSON value ({exc}):\n{stdout[-2000:]}"
            ) from exc
        missing = sorted(keys - _json_keys(actual))
        if missing:
            raise AssertionError(
                f"{text!r}: documented JSON keys {missing} are not in its output:\n{stdout}"
            )


def evaluate_console(example: Example) -> str | None:
    try:
        page = page_for(example)
        for kind, command, output in _console_items(example.parsed):
            if kind == "synopsis":
                check_synopsis(command)
            else:
                run_command(page, command, output)
    except AssertionError as exc:
        return str(exc)
    except Exception:
        return traceback.format_exc()
    return None


# ------------------------------------------------------------------------------------ the Sybil

SYBIL = Sybil(
    parsers=[
        _python_or_doctest_parser(),
        CodeBlockParser("console", evaluate_console),
        SkipParser(),
    ],
    path=str(ROOT),
    patterns=["README.md", "docs/*.md"],
    teardown=teardown,
    name="docs",
)
_collect = SYBIL.pytest()


def pytest_collect_file(file_path: Path, parent: Any) -> Any:
    """Collect README.md and docs/*.md only (not the provenance READMEs under tests/assets)."""
    if file_path == ROOT / "README.md" or file_path.parent == ROOT / "docs":
        return _collect(file_path, parent)
    return None

"""Registry credentials and ``WWW-Authenticate`` challenges.

Where credentials come from, in Docker's order for a registry host:

1. ``~/.docker/config.json`` (or ``$DOCKER_CONFIG/config.json``): ``credHelpers[host]``, else
   ``credsStore``, through the ``docker-credential-<name> get`` protocol (server URL on stdin, JSON
   ``{"Username", "Secret"}`` on stdout); else ``auths[host]`` (``auth`` = base64 ``user:password``,
   or ``username``/``password``);
2. Amazon ECR hosts (``<account>.dkr.ecr[-fips].<region>.amazonaws.com[.cn]``): ``GetAuthorizationToken``
   through botocore (extra ``kms``) with the standard AWS configuration;
3. none: anonymous.

Challenges: ``Basic`` (credentials sent as is) and ``Bearer realm=…,service=…,scope=…`` (a token
fetched from the realm, with the credentials as basic auth when there are any). Not supported:
identity tokens (OAuth2 refresh tokens, ``Username: <token>``) — they are refused with a message.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enclavekit.eif.registry.reference import DOCKER_HUB, DOCKER_HUB_CONFIG_KEY
from enclavekit.errors import UsageError

#: docker-credential helpers must answer within this many seconds.
HELPER_TIMEOUT = 30
#: config.json and helper answers larger than this are refused.
MAX_CONFIG_BYTES = 1 << 20
_ECR_HOST = re.compile(r"^(\d{12})\.dkr\.ecr(-fips)?\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?$")


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str
    source: str  # where they came from, for messages (never the secret)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=***, source={self.source!r})"

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lower-case: "basic" or "bearer"
    params: Mapping[str, str]


_RFC7230_TCHARS = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM = re.compile(
    rf'\s*({_RFC7230_TCHARS})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_RFC7230_TCHARS}))\s*(?:,|$)'
)


def parse_challenge(header: str) -> Challenge | None:
    """The first challenge of a ``WWW-Authenticate`` header (RFC 7235 auth-params), or None."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        match = _PARAM.match(rest, pos)
        if match is None:
            break
        value = match.group(2)
        value = re.sub(r"\\(.)", r"\1", value) if value is not None else match.group(3)
        params[match.group(1).lower()] = value
        pos = match.end()
    return Challenge(scheme.lower(), params)


def docker_config_path(environ: Mapping[str, str] = os.environ) -> Path:
    directory = environ.get("DOCKER_CONFIG")
    return Path(directory) / "config.json" if directory else Path.home() / ".docker" / "config.json"


def _config_key(key: str) -> str:
    """``https://host:5000/v1/`` → ``host:5000`` (how Docker matches auths keys)."""
    key = key.removeprefix("https://").removeprefix("http://")
    return key.split("/", 1)[0]


def _load_config(path: Path) -> Mapping[str, Any]:
    try:
        data = path.read_bytes()[: MAX_CONFIG_BYTES + 1]
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read the Docker config {path}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise UsageError(f"the Docker config {path} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"the Docker config {path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UsageError(f"the Docker config {path} is not a JSON object")
    return config


def _from_helper(helper: str, server: str, path: Path) -> Credentials | None:
    program = f"docker-credential-{helper}"
    executable = shutil.which(program)
    if executable is None:
        raise UsageError(
            f"{path} names the credential helper {helper!r} for {server}, but {program} is not on "
            "PATH; install it or remove it from the config"
        )
    try:
        done = subprocess.run(
            [executable, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"{program} get failed for {server}: {exc}") from None
    if done.returncode != 0:
        message = done.stdout.decode(errors="replace").strip()
        if "credentials not found" in message.lower():
            return None
        raise UsageError(
            f"{program} get failed for {server} (exit {done.returncode}): "
            f"{message[:200] or done.stderr.decode(errors='replace').strip()[:200]}"
        )
    try:
        answer = json.loads(done.stdout[:MAX_CONFIG_BYTES])
        username, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(
            f'{program} get answered something other than {{"Username", "Secret"}} JSON'
        ) from None
    if not isinstance(username, str) or not isinstance(secret, str):
        raise UsageError(f"{program} get answered non-string credentials")
    if username == "<token>":
        raise UsageError(
            f"{program} holds an identity token for {server}; identity tokens are not supported, "
            "log in with a user name and password or access token"
        )
    return Credentials(username, secret, f"docker-credential-{helper}")


def docker_credentials(
    registry: str, environ: Mapping[str, str] = os.environ
) -> Credentials | None:
    """Credentials for ``registry`` (``docker.io`` or host[:port]) from the Docker config."""
    path = docker_config_path(environ)
    config = _load_config(path)
    server = DOCKER_HUB_CONFIG_KEY if registry == DOCKER_HUB else registry
    wanted = {registry, "index.docker.io"} if registry == DOCKER_HUB else {registry}
    helpers = config.get("credHelpers") or {}
    if isinstance(helpers, dict):
        for key, helper in helpers.items():
            if _config_key(key) in wanted and isinstance(helper, str):
                return _from_helper(helper, server, path)
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        found = _from_helper(store, server, path)
        if found is not None:
            return found
    auths = config.get("auths") or {}
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if _config_key(key) not in wanted or not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, sep, password = (
                    base64.b64decode(entry["auth"], validate=True).decode().partition(":")
                )
            except (binascii.Error, UnicodeDecodeError):
                raise UsageError(
                    f"{path}: auths[{key!r}].auth is not base64 of user:password"
                ) from None
            if not sep:
                raise UsageError(f"{path}: auths[{key!r}].auth is not base64 of user:password")
            return Credentials(user, password, str(path))
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"], str(path))
        if entry.get("identitytoken"):
            raise UsageError(
                f"{path}: auths[{key!r}] holds an identity token; identity tokens are not supported"
            )
    return None


def is_ecr_host(registry: str) -> bool:
    return _ECR_HOST.match(registry) is not None


def ecr_credentials(registry: str, *, client: Any = None) -> Credentials:
    """``AWS`` and a 12-hour password from ECR ``GetAuthorizationToken`` (botocore, extra ``kms``)."""
    match = _ECR_HOST.match(registry)
    if match is None:
        raise ValueError(f"{registry} is not an ECR registry host")
    if client is None:
        try:
            import botocore.session
        except ImportError:
            raise UsageError(
                f"pulling from Amazon ECR ({registry}) needs botocore: install enclavekit with the "
                "'kms' extra (pip install 'enclavekit[kms,registry]')"
            ) from None
        try:
            client = botocore.session.get_session().create_client("ecr", region_name=match.group(3))
        except Exception as exc:  # botocore's configuration errors have no common base
            raise UsageError(f"cannot set up the ECR client for {registry}: {exc}") from None
    try:
        answer = client.get_authorization_token(registryIds=[match.group(1)])
        token = answer["authorizationData"][0]["authorizationToken"]
        user, sep, password = base64.b64decode(token).decode().partition(":")
    except (KeyError, IndexError, TypeError, ValueError, binascii.Error):
        raise UsageError(f"ECR GetAuthorizationToken for {registry} gave no usable token") from None
    except Exception as exc:  # ClientError, NoCredentialsError, EndpointConnectionError, ...
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and "Error" in response:
            error = response["Error"]
            detail = f"{error.get('Code', '?')}: {error.get('Message', '')}"
        else:
            detail = str(exc)
        raise UsageError(
            f"ECR GetAuthorizationToken for {registry} failed: {detail}; check the AWS "
            "credentials and that they may call ecr:GetAuthorizationToken"
        ) from None
    if not sep:
        raise UsageError(f"ECR GetAuthorizationToken for {registry} gave no usable token")
    return Credentials(user, password, "Amazon ECR GetAuthorizationToken")


def find_credentials(registry: str, environ: Mapping[str, str] = os.environ) -> Credentials | None:
    """Docker config first, then ECR for ECR hosts, else None (anonymous)."""
    found = docker_credentials(registry, environ)
    if found is None and is_ecr_host(registry):
        found = ecr_credentials(registry)
    return found

"""hello-enclave: the example enclave application of ``enclavekit demo`` (enclavekit + stdlib only).

Inside the enclave it

1. opens the NSM (``Nsm.open()``: ``/dev/nsm`` in a real enclave, the runner's emulator locally);
2. reaches the attestation CA through the parent: a local TCP port tunnelled to ``vsock://3:8000``
   (the parent relays that port to the CA), and obtains a certificate for a fresh in-memory P-384
   key by attestation (:class:`enclavekit.atls.server.EnclaveIdentity`: challenge → NSM document
   binding the key and the nonce → CSR → certificate carrying the document);
3. serves attested TLS (:class:`~enclavekit.atls.server.AttestedTlsProxy` on loopback, which also
   answers ``/.well-known/attestation?nonce=``) in front of a small HTTP application, and relays
   ``vsock://ANY:5000`` to it byte for byte (TLS ends inside the enclave, never at the relay);
4. the application answers ``POST /hello`` whose body is a payload sealed (HPKE,
   :func:`enclavekit.atls.seal.seal`) to the attested key: it unseals it with the private key that
   never left the enclave and answers with a greeting and the SHA-256 of what it decrypted.

Everything it prints goes to the enclave console. It runs until terminated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from enclavekit.atls.seal import unseal
from enclavekit.atls.server import AttestedTlsProxy, EnclaveIdentity, start_proxy_in_thread
from enclavekit.errors import Error
from enclavekit.nsm import Nsm
from enclavekit.run import vsock
from enclavekit.transport.server import RelayServer

#: The service name the CA knows this application by.
SERVICE = "hello-enclave"
#: The parent relays this vsock port (CID 3) to the attestation CA.
CA_VSOCK_PORT = 8000
#: Attested TLS is served on this vsock port.
SERVICE_VSOCK_PORT = 5000
#: Who the greeting comes from; the demo's tampered build changes this line.
GREETER = "hello-enclave"
#: Bound on a request body (a sealed greeting is tiny).
MAX_BODY = 64 * 1024


def say(message: str) -> None:
    print(f"[hello-enclave] {message}", flush=True)


def start_ca_tunnel() -> int:
    """A loopback TCP port whose connections are relayed to the CA via the parent."""
    listener = socket.create_server(("127.0.0.1", 0))
    relay = RelayServer(lambda: vsock.connect(f"vsock://3:{CA_VSOCK_PORT}", timeout=10))
    relay.start(listener)
    port: int = listener.getsockname()[1]
    return port


def start_application(identity: EnclaveIdentity) -> int:
    """The HTTP application behind the TLS proxy (loopback only); returns its port."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path != "/hello":
                self._answer(404, {"error": "only POST /hello exists"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                self._answer(400, {"error": f"expected a sealed body of 1..{MAX_BODY} bytes"})
                return
            sealed = self.rfile.read(length)
            try:
                plaintext = unseal(sealed, identity.current.key)
            except Error as exc:
                say(f"refused a payload: {exc}")
                self._answer(400, {"error": str(exc)})
                return
            try:
                name = json.loads(plaintext).get("name", "stranger")
            except (ValueError, AttributeError):
                name = "stranger"
            say(f"unsealed {len(plaintext)} bytes sealed to the attested key")
            self._answer(
                200,
                {
                    "greeting": f"Hello, {name}! -- {GREETER}",
                    "plaintext_sha256": hashlib.sha256(plaintext).hexdigest(),
                },
            )

        def _answer(self, status: int, body: dict[str, str]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, name="hello-app", daemon=True).start()
    port: int = server.server_address[1]
    return port


def serve_on_vsock(tls_port: int) -> None:
    """Relay ``vsock://ANY:5000`` to the TLS proxy on loopback (TLS passes through untouched)."""
    listener = vsock.listen(f"vsock://ANY:{SERVICE_VSOCK_PORT}")
    relay = RelayServer(lambda: socket.create_connection(("127.0.0.1", tls_port), timeout=10))
    say(f"serving attested TLS on vsock port {SERVICE_VSOCK_PORT}")
    relay.serve_forever(listener)


def main() -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
    try:
        nsm = Nsm.open()
        description = nsm.describe_nsm()
        say(f"NSM module {description.module_id}")
        ca_port = start_ca_tunnel()
        identity = EnclaveIdentity(f"http://127.0.0.1:{ca_port}", SERVICE, nsm)
        current = identity.obtain()
        say(
            f"certificate {current.certificate.serial_number:x} issued by the attestation CA"
            f" for a key generated in the enclave (valid until"
            f" {current.certificate.not_valid_after_utc:%H:%M:%S} UTC)"
        )
        identity.start_renewal()
        app_port = start_application(identity)
        proxy = start_proxy_in_thread(AttestedTlsProxy(identity, ("127.0.0.1", app_port)))
        serve_on_vsock(proxy.port)
    except Error as exc:
        say(f"error: {exc.diagnostics()}")
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

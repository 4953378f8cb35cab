"""Attested TLS: a CA that certifies attested enclaves, the enclave side, the client side, and
sealed payloads.

Modules (one job each):

- :mod:`.ca` — issuance logic (pure; injected ``clock``): :class:`~.ca.Issuer`, policies
  (:class:`~.ca.CaPolicy`, :class:`~.ca.ServicePolicy`, :func:`~.ca.load_ca_policy`), CA state
  (:func:`~.ca.init_state_dir`, :func:`~.ca.load_ca_keys`), :class:`~.ca.NitroEvidenceVerifier`.
- :mod:`.store` — challenges, certificates, revocations and audit log in SQLite
  (:class:`~.store.SqliteStore`) or PostgreSQL (:class:`~.store.PostgresStore`);
  :func:`~.store.open_store`.
- :mod:`.service` — the FastAPI app (:func:`~.service.create_app`) and
  :func:`~.service.start_in_thread` for in-process use.
- :mod:`.extension` — the certificate extension (OID ``2.25.235260286923429261441635229802985584374.1``)
  that embeds the attestation document.
- :mod:`.server` — enclave side: :class:`~.server.EnclaveIdentity` (key, challenge, NSM, certificate,
  renewal), :class:`~.server.AttestedTlsProxy` / :func:`~.server.start_proxy_in_thread` /
  :func:`~.server.run_proxy`, and ``/.well-known/attestation``.
- :mod:`.client` — :class:`~.client.AttestedClient` (verify before sending; pinned follow-up
  connection; ``request()`` and ``httpx_client()``).
- :mod:`.acme` — :class:`~.acme.AcmeIdentity`: publicly trusted certificates by ACME (http-01,
  :class:`~.acme.Http01Responder`), bound to the enclave by the fresh attestation answer.
- :mod:`.client_auth` — mutual attested TLS: :class:`~.client_auth.ClientAuthPolicy` (the proxy's
  client check) and the forwarded identity header.
- :mod:`.ca_tls` — the CA's own HTTPS certificate (``ca serve --tls``) and the CA client's trust.
- :mod:`.metrics` — Prometheus metrics: :class:`~.metrics.CaMetrics`, :class:`~.metrics.ProxyMetrics`.
- :mod:`.seal` — HPKE sealed payloads (:func:`~.seal.seal`, :func:`~.seal.unseal`, format v1).

Library use without the CLI (what ``enclavekit demo`` / ``run`` build on)::

    from enclavekit.atls.ca import CaPolicy, Issuer, NitroEvidenceVerifier, ServicePolicy, init_state_dir
    from enclavekit.atls.client import AttestedClient
    from enclavekit.atls.server import AttestedTlsProxy, EnclaveIdentity, start_proxy_in_thread
    from enclavekit.atls.service import create_app, start_in_thread
    from enclavekit.atls.store import SqliteStore
    from enclavekit.attestation import Verifier
    from enclavekit.attestation.policy import PcrsEqual
    from enclavekit.nsm import EmulatedAwsPki, Nsm, NsmEmulator

    pki = EmulatedAwsPki.ephemeral()
    emulator = NsmEmulator(pcrs=pcrs, pki=pki)
    nsm_roots = Verifier([pki.root_certificate()])          # emulator root: explicit, never default
    keys = init_state_dir(state_dir)                          # CA key + root
    policy = CaPolicy({"web": ServicePolicy("web", ("localhost",), (pcrs,))})
    issuer = Issuer(keys, policy, SqliteStore(state_dir / "ca.sqlite3"), NitroEvidenceVerifier(nsm_roots))
    ca = start_in_thread(create_app(issuer))                  # ca.url, ca.stop()

    identity = EnclaveIdentity(ca.url, "web", Nsm.in_process(emulator))
    identity.obtain()                                         # or start_renewal() for background renewal
    proxy = start_proxy_in_thread(AttestedTlsProxy(identity, ("127.0.0.1", app_port)))

    client = AttestedClient(keys.root, verifier=nsm_roots, policy=PcrsEqual(pcrs), fresh=True)
    peer, response = client.request("GET", f"https://localhost:{proxy.port}/")

    from enclavekit.atls.seal import (
        generate_sealing_key, load_recipient_key, public_key_der, seal, unseal,
    )
    key = generate_sealing_key()                              # inside the enclave
    doc = emulator.attest(public_key=public_key_der(key))     # attest the sealing key
    verified = nsm_roots.verify(doc, PcrsEqual(pcrs))         # outside: verify first ...
    blob = seal(b"secret", load_recipient_key(verified.public_key))   # ... then seal
    assert unseal(blob, key) == b"secret"
"""

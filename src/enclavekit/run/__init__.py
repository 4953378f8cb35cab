"""Running EIFs on this machine the way the enclave's ``init`` would (no hypervisor, no kernel boot).

Modules, one job each:

- :mod:`~enclavekit.run.cpio`: streaming newc cpio parser and path-traversal-safe unpacker.
- :mod:`~enclavekit.run.vsock`: vsock emulated over unix sockets (``ENCLAVEKIT_VSOCK_DIR``).
- :mod:`~enclavekit.run.state`: enclave records under the state directory (nitro-cli JSON shapes).
- :mod:`~enclavekit.run.launch`: open + check + unpack an EIF into an enclave directory.
- :mod:`~enclavekit.run.supervisor`: the per-enclave process (emulated NSM server + the app).
- :mod:`~enclavekit.run.runner`: ``run_enclave``, ``describe_enclaves``, ``terminate_enclave``,
  ``console``.

What this is not: isolation. The application runs as a process of this machine (chrooted in a
private mount namespace when root), sharing its kernel, network and users. It is a faithful
development and test stand-in for the enclave's *interfaces* (the NSM, vsock, the rootfs contract of
``init``), not for its security boundary.
"""

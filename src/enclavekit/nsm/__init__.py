"""The Nitro Secure Module: a client for the real ``/dev/nsm`` and a faithful emulator.

Stable API (other packages build on these names):

- :class:`Nsm` (``enclavekit.nsm.client``): ``Nsm.open()`` (``$ENCLAVEKIT_NSM`` → emulator socket,
  else ``/dev/nsm``, else a UsageError explaining both), ``Nsm.in_process(emulator)``,
  ``Nsm.connect(url)``, ``Nsm.device(path)``; methods ``describe_nsm() -> NsmDescription``,
  ``describe_pcr(i) -> PcrDescription`` (``.lock``, ``.data``; unpacks as ``locked, value``),
  ``extend_pcr(i, data) -> bytes``, ``lock_pcr(i)``, ``lock_pcrs(range_)``,
  ``get_random(length=None) -> bytes``, ``attestation(user_data=None, nonce=None, public_key=None)
  -> bytes`` (raw COSE_Sign1, unverified). Refusals raise :class:`enclavekit.errors.NsmError` whose
  ``code`` is the NSM's error name (``"InvalidIndex"``, ``"ReadOnlyIndex"``, ``"InputTooLarge"``,
  ...).
- :class:`NsmEmulator` (``enclavekit.nsm.emulator``): ``NsmEmulator(pcrs={0: b"..."},
  debug_mode=False, pki=EmulatedAwsPki.load_or_create(state_dir), module_id=None, clock=utc_now,
  definite_payload=False)`` or ``NsmEmulator.from_eif(path, pcrs=..., **same)``;
  ``emulator.attest(user_data, nonce, public_key, now=...)`` signs directly;
  ``emulator.pki.root_certificate()`` is the root to pin in a verifier (never trusted by default).
- :class:`EmulatedAwsPki` (``enclavekit.pki.emulated``): ``load_or_create(state_dir=None)`` (default
  ``$ENCLAVEKIT_STATE_DIR/nsm``, else ``$XDG_STATE_HOME/enclavekit/nsm``, else
  ``~/.local/state/enclavekit/nsm``), ``ephemeral()``, ``root_certificate()``, ``root_pem()``.
- ``enclavekit.nsm.server``: ``EmulatorServer(emulator, url)`` (asyncio, unix + tcp, 4-byte
  big-endian length-prefixed CBOR frames), ``serve(emulator, url)`` (blocking) and
  ``serve_in_background(emulator, "tcp://127.0.0.1:0")`` (a context manager yielding the bound URL,
  for tests: set ``ENCLAVEKIT_NSM`` to it).
- ``enclavekit.nsm.messages``: the request/response model with exact CBOR encodings and
  :class:`ErrorCode`.
- ``enclavekit.nsm.device``: the ``/dev/nsm`` ioctl (``0xC0200A00``) with an injectable ioctl
  function.
"""

from __future__ import annotations

from enclavekit.nsm.client import ENV_VAR, Nsm
from enclavekit.nsm.emulator import NsmEmulator
from enclavekit.nsm.messages import ErrorCode, NsmDescription, PcrDescription
from enclavekit.pki.emulated import EmulatedAwsPki

__all__ = [
    "ENV_VAR",
    "EmulatedAwsPki",
    "ErrorCode",
    "Nsm",
    "NsmDescription",
    "NsmEmulator",
    "PcrDescription",
]

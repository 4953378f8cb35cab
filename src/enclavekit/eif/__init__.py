"""Enclave Image Files: read, write, measure and sign them exactly as nitro-cli does.

Modules, one job each:

- :mod:`~enclavekit.eif.format`: header/section structs,
  :class:`~enclavekit.eif.format.SectionType`, CRC-32.
- :mod:`~enclavekit.eif.measure`: PCR hashing. :class:`~enclavekit.eif.measure.Measurements`
  (``pcr0, pcr1, pcr2: bytes``, ``pcr8: bytes | None``, ``hash_algorithm: str``; ``.pcrs`` → ``{i:
  bytes}``, ``.to_json()`` → nitro-cli's ``Measurements`` object), ``pcr_of_bytes``,
  ``pcr_of_file``, ``pcr3_of_iam_role``, ``pcr4_of_instance_id``, ``pcr8_of_certificate``,
  ``extend``, ``PcrHasher``.
- :mod:`~enclavekit.eif.metadata`: the metadata section (``IdentityInfo``, ``BuildInfo``).
- :mod:`~enclavekit.eif.sign`: the signature section (``EifSigner.from_files(cert, key)``; CBOR/COSE
  codecs).
- :mod:`~enclavekit.eif.writer`: streaming, measuring, atomic writer.
- :mod:`~enclavekit.eif.reader`: streaming reader ``Eif.open(path)``; ``measure_eif(path)``.
- :mod:`~enclavekit.eif.describe`: nitro-cli's describe-eif JSON; :mod:`~enclavekit.eif.signing`:
  sign-eif.

Writer API (stable; used by build-enclave)::

    from enclavekit.eif.writer import write_eif, write_eif_file
    from enclavekit.eif.metadata import IdentityInfo, BuildInfo, rfc3339_now
    from enclavekit.eif.sign import EifSigner

    measurements = write_eif(
        "app.eif",
        kernel=Path("bzImage"),            # bytes | path | binary stream | iterable of byte chunks
        cmdline="reboot=k panic=30 ...",   # str (UTF-8) or bytes; stored without NUL
        ramdisks=[bootstrap_cpio, customer_cpio_chunks],   # ≥ 1, same forms as kernel
        metadata=IdentityInfo("name", "version", BuildInfo(build_time=rfc3339_now())),
        signer=EifSigner.from_files("cert.pem", "key.pem"),   # or None
        arch="x86_64",                     # or "aarch64" (header flag bit 0)
        progress=lambda written: ...,      # optional, bytes of section data written so far
    )
    measurements.to_json()  # {"HashAlgorithm": "Sha384 { ... }", "PCR0": ..., "PCR1": ..., "PCR2":
    ...}

Layout written: header, kernel, cmdline, metadata, ramdisks..., [signature] — contiguous, correct
offset table, CRC over everything; to a temp file renamed over the target. ``write_eif_file``
returns a ``WrittenEif(path, header, measurements)``. ``EifWriter(stream)`` writes arbitrary section
sequences.

Reader API (used by ``nsm serve --eif-path``)::

    from enclavekit.eif.reader import Eif, measure_eif
    measure_eif("app.eif")          # -> Measurements (checks CRC and structure; raises EifError
    subclasses) with Eif.open("app.eif") as eif:
        eif.header, eif.sections    # parsed, validated against the offset table
        report = eif.verify()       # one streaming pass: measurements, CRC, signature check
"""

"""``sign-eif``: add or replace an EIF's signature section as nitro-cli does (spec ``eif.md`` §1.4,
§3).

An unsigned EIF gets the signature section appended as its last section; a signed one has its
signature section replaced where it is. The header's offset table, sizes and CRC are rewritten. The
result is written to a temp file and renamed over the output (the input itself by default), so a
failure leaves no partial file.

Checked first: the input's layout and CRC (a damaged image is not signed). The old signature, if
any, is not checked (it is being replaced).
"""

from __future__ import annotations

import os
from pathlib import Path

from enclavekit.eif.format import SectionType
from enclavekit.eif.measure import HASH_ALGORITHM_SHA384, Measurements
from enclavekit.eif.reader import Eif
from enclavekit.eif.sign import EifSigner
from enclavekit.eif.writer import EifWriter, atomic_output
from enclavekit.errors import EifIntegrityError


def sign_eif(
    path: str | os.PathLike[str],
    signer: EifSigner,
    *,
    output: str | os.PathLike[str] | None = None,
    hash_algorithm: str = HASH_ALGORITHM_SHA384,
) -> Measurements:
    """Sign the EIF at ``path`` (PCR0 signed with ``signer``) and write it to ``output`` (default:
    in place).

    Returns the measurements of the signed image (PCR8 included).
    """
    target = Path(output) if output is not None else Path(path)
    with Eif.open(path) as eif:
        if eif.header.version < 3:
            raise EifIntegrityError(
                f"{path} is an EIF version {eif.header.version}; signatures need version 3 or later"
            )
        report = eif.verify(hash_algorithm=hash_algorithm, check_signature=False)
        if not report.crc_ok:
            raise EifIntegrityError(
                f"{path}: " + report.problems()[0] + "; refusing to sign a damaged image"
            )
        pcr0 = report.measurements.pcr0
        section = signer.signature_section(pcr0)
        with atomic_output(target) as stream:
            writer = EifWriter(
                stream,
                version=eif.header.version,
                flags=eif.header.flags,
                default_mem=eif.header.default_mem,
                default_cpus=eif.header.default_cpus,
            )
            try:
                replaced = False
                for original in eif.sections:
                    if original.section_type == SectionType.SIGNATURE:
                        writer.add_section(SectionType.SIGNATURE, section)
                        replaced = True
                    else:
                        writer.add_section(original.section_type, eif.iter_section(original))
                if not replaced:
                    writer.add_section(SectionType.SIGNATURE, section)
                copied = writer.measurer.result(hash_algorithm=hash_algorithm)
                if copied.pcr0 != pcr0:
                    raise EifIntegrityError(f"{path} changed while it was being signed; try again")
                writer.finish()
            finally:
                writer.close()
    m = report.measurements
    return Measurements(m.pcr0, m.pcr1, m.pcr2, signer.pcr8, hash_algorithm)

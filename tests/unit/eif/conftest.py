"""Fixtures for the EIF tests (helpers in :mod:`tests.unit.eif.helpers`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from enclavekit.eif.metadata import IdentityInfo
from enclavekit.eif.sign import EifSigner
from enclavekit.eif.writer import write_eif_file
from tests.unit.eif.helpers import (
    CMDLINE,
    SigningMaterial,
    SyntheticEif,
    make_signing_material,
    sample_metadata,
    section_bytes,
)


@pytest.fixture
def make_eif(tmp_path: Path) -> Callable[..., SyntheticEif]:
    """Write an EIF from synthetic sections; returns the inputs for independent checks."""

    def make(
        name: str = "app.eif",
        *,
        kernel_size: int = 70_001,
        ramdisk_sizes: Sequence[int] = (30_003, 90_007),
        signer: EifSigner | None = None,
        metadata: IdentityInfo | bytes | None = None,
        version: int = 4,
    ) -> SyntheticEif:
        kernel = section_bytes("kernel", kernel_size)
        ramdisks = tuple(section_bytes(f"ramdisk{i}", n) for i, n in enumerate(ramdisk_sizes))
        if metadata is None and version >= 4:
            metadata = sample_metadata()
        path = tmp_path / name
        write_eif_file(
            path,
            kernel=kernel,
            cmdline=CMDLINE,
            ramdisks=list(ramdisks),
            metadata=metadata,
            signer=signer,
            version=version,
        )
        return SyntheticEif(path, kernel, CMDLINE, ramdisks)

    return make


@pytest.fixture(scope="session")
def signing_p384(tmp_path_factory: pytest.TempPathFactory) -> SigningMaterial:
    return make_signing_material(tmp_path_factory.mktemp("keys"), ec.SECP384R1())


@pytest.fixture(scope="session")
def signing_p256(tmp_path_factory: pytest.TempPathFactory) -> SigningMaterial:
    return make_signing_material(tmp_path_factory.mktemp("keys"), ec.SECP256R1())


@pytest.fixture(scope="session")
def signing_p521(tmp_path_factory: pytest.TempPathFactory) -> SigningMaterial:
    return make_signing_material(tmp_path_factory.mktemp("keys"), ec.SECP521R1())


@pytest.fixture
def eif_assets(assets: Path) -> Path:
    return assets / "eif"

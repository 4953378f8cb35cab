"""Random request sequences against a plain model of the NSM's PCR rules (nsm.md §4)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from enclavekit._cbor import loads
from enclavekit.errors import NsmError
from enclavekit.nsm import Nsm, NsmEmulator

_EMULATOR_PKI = (
    NsmEmulator().pki
)  # one key hierarchy for every run (key generation is the slow part)

indexes = st.integers(0, 40)


class NsmModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        emulator = NsmEmulator(pcrs={1: b"\x01" * 48}, pki=_EMULATOR_PKI)
        self.nsm = Nsm.in_process(emulator)
        self.values = [emulator.pcr(i)[1] for i in range(32)]
        self.locked = [i < 16 for i in range(32)]

    def expect_error(self, code: str, call: object, *args: object) -> None:
        with pytest.raises(NsmError) as excinfo:
            call(*args)  # type: ignore[operator]
        assert excinfo.value.code == code

    @rule(index=indexes, data=st.binary(max_size=40))
    def extend(self, index: int, data: bytes) -> None:
        if index >= 32:
            self.expect_error("InvalidIndex", self.nsm.extend_pcr, index, data)
        elif self.locked[index]:
            self.expect_error("ReadOnlyIndex", self.nsm.extend_pcr, index, data)
        else:
            self.values[index] = hashlib.sha384(self.values[index] + data).digest()
            assert self.nsm.extend_pcr(index, data) == self.values[index]

    @rule(index=indexes)
    def lock(self, index: int) -> None:
        if index >= 32:
            self.expect_error("InvalidIndex", self.nsm.lock_pcr, index)
        elif self.locked[index]:
            self.expect_error("ReadOnlyIndex", self.nsm.lock_pcr, index)
        else:
            self.nsm.lock_pcr(index)
            self.locked[index] = True

    @rule(range_=st.integers(0, 40))
    def lock_range(self, range_: int) -> None:
        if range_ > 32:
            self.expect_error("InvalidIndex", self.nsm.lock_pcrs, range_)
        else:
            self.nsm.lock_pcrs(range_)
            for i in range(range_):
                self.locked[i] = True

    @rule(index=indexes)
    def describe(self, index: int) -> None:
        if index >= 32:
            self.expect_error("InvalidIndex", self.nsm.describe_pcr, index)
        else:
            assert tuple(self.nsm.describe_pcr(index)) == (self.locked[index], self.values[index])

    @rule()
    def attest(self) -> None:
        payload = loads(loads(self.nsm.attestation())[2])
        expected = {i: self.values[i] for i in range(32) if self.locked[i]}
        assert payload["pcrs"] == expected

    @invariant()
    def locked_list_matches(self) -> None:
        locked = self.nsm.describe_nsm().locked_pcrs
        assert locked == tuple(i for i in range(32) if self.locked[i])


TestNsmModel = NsmModel.TestCase
TestNsmModel.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)

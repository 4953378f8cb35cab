"""Example enclave applications shipped with enclavekit (see ``enclavekit demo``)."""

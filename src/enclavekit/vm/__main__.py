"""``python -m enclavekit.vm``: see :mod:`enclavekit.vm.commands`."""

from enclavekit.vm.commands import run

run()

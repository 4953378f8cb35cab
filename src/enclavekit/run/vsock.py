"""vsock emulated over unix sockets for locally run enclaves: see :mod:`enclavekit.transport.emulation`.

Kept as the runner's name for the same module; :mod:`enclavekit.transport` honours the emulation itself.
"""

from enclavekit.transport.emulation import (
    ENV_CID,
    ENV_DIR,
    bound_address,
    connect,
    emulated_socket_path,
    emulation_dir,
    listen,
    local_cid,
    open_connection,
    socket_path,
    start_server,
)

__all__ = [
    "ENV_CID",
    "ENV_DIR",
    "bound_address",
    "connect",
    "emulated_socket_path",
    "emulation_dir",
    "listen",
    "local_cid",
    "open_connection",
    "socket_path",
    "start_server",
]

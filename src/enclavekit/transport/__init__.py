"""Transports between an enclave and its parent: vsock (virtio-vsock, vhost-user back-end for QEMU)."""

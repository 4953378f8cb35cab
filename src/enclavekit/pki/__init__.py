"""Trust roots: the pinned AWS Nitro Enclaves root (package data) and helpers to load others.

``roots`` holds trust anchors; ``emulated`` builds the emulator's AWS-shaped test PKI (root → regional →
zonal → instance → rotating leaf), which is never part of a default trust store.
"""

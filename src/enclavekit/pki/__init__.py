"""Trust roots: the pinned AWS Nitro Enclaves root (package data) and helpers to load others.

``roots`` holds trust anchors; ``emulated`` (when present) builds the emulator's AWS-shaped test PKI, which is
never part of a default trust store.
"""

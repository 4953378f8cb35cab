"""Public-key infrastructure: trust roots and the emulated AWS-shaped chain.

- :mod:`enclavekit.pki.emulated`: an AWS-shaped CA chain (root → regional → zonal → instance →
  rotating leaf) for the NSM emulator. Its root is **never** trusted by default.
"""

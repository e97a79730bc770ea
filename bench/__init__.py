"""Benchmarks of pyunionfs against a plain directory, the kernel's overlayfs, fuse-overlayfs and unionfs-fuse.

Run ``python -m bench`` from the repository root as root; see bench/README.md. Speed is measured
here and reported, never asserted by the test suite.
"""

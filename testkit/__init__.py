"""Test and benchmark helpers that run real services on loopback (not part of the pihub package)."""

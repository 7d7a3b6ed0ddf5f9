"""pihub: small, separate MQTT daemons that make a Raspberry Pi a home hub."""

# A literal (read by pyproject.toml too): importlib.metadata would cost every daemon ~1 MB.
__version__ = "0.1.0"

"""pihub: small, separate MQTT daemons that make a Raspberry Pi a home hub."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pihub")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"

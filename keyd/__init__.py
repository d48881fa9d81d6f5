"""keyd: unlock a NAS's encrypted storage stack when a trusted USB key is plugged in."""

__version__ = "0.1.0"

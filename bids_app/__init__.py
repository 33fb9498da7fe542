"""epvs-bids: a BIDS-App that finds and measures enlarged perivascular spaces (ePVS)."""

try:
    from ._version import __version__
except ImportError:  # pragma: no cover - running from a source tree without a build
    __version__ = "0+unknown"

__all__ = ["__version__"]

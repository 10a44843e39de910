"""The synchro CLI and the local runtime (`synchro up`)."""

__version__ = "0.1.0"

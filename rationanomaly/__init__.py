"""RationAnomaly pipeline: the command-line entry point lives in rationanomaly.cli."""

__version__ = "0.1.0"

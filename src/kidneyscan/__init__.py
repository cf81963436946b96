"""KidneyScan: privacy-preserving federated kidney CT classification."""

__version__ = "0.1.0"

"""Federated learning with Flower across hospitals: apps, privacy, secure aggregation."""

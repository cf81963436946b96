"""Federated learning with Flower: apps, privacy, secure aggregation, deployment."""

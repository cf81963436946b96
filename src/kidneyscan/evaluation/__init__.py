"""Evaluation: metrics (per class, macro, ROC-AUC, ECE, bootstrap CIs), calibration, reports."""

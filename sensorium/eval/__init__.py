"""Evaluation: metrics and runners."""

"""Data loading, synthetic data, metrics and other helpers."""

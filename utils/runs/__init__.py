"""Runs: the shared run options and model identity (pipeline), the feature cache, checkpoints and the Ray engine.
Imports only utils.data."""

"""Helpers below the commands, one sub-package per concern: data, evaluation, runs, station (docs/layout.md);
logs.py is the one logging setup."""

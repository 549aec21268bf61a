"""Runnable example models and scripts (installed as ``autoshard.examples`` for the demo and tests)."""

"""Synthetic tasks with verifiable answers, embedded so that runs and tests need no download."""

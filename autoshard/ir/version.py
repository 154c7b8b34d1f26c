"""The autoshard version: recorded in plans and cache keys, so it lives in the base layer."""

__version__ = "0.1.0"

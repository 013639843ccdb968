"""Tactic Server: a long-context inference server whose decode attention is Tactic."""

__version__ = "0.1.0"

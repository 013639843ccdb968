"""The OpenAI-compatible HTTP front end: routes, schemas, errors, auth, limits and metrics."""

from .app import create_app

__all__ = ["create_app"]

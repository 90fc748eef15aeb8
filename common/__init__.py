"""Shared core of Ara: settings, wire protocol, auth and the backend interfaces."""

__version__ = "0.1.0"

"""Errors meant for the person at the terminal: the CLI prints them as one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix (a config value, a missing file, a missing package); ``str()`` says what."""

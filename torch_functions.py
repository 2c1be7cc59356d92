"""Losses, feature normalisation and small shared helpers."""


class UserInputError(Exception):
    """Bad user input (a flag, a path, a file): one clear line, turned into exit code 2 by main.py."""

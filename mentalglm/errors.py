"""Errors a user fixes by changing the configuration; train.py and evaluate.py print them as one line."""


class ConfigError(ValueError):
    """A configuration mistake the user can fix; train.py prints it as one line."""

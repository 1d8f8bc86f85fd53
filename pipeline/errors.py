"""Exception types for mistakes a user can make (bad config, bad input data).

The CLI turns a `UserError` into a one-line message and exit code 2; anything else is a bug and
keeps its traceback (STYLE.md: ValueError for user errors, assert for internal bugs).
"""


class UserError(ValueError):
    """A problem with the user's input, explained in one line that says what to do."""


class ConfigError(UserError):
    """A config key is unknown, mistyped or out of range."""


class DataError(UserError):
    """Input data that cannot be used: missing sources, unreadable datasets, corrupt shards."""

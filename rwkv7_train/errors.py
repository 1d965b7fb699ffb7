"""Errors a user can cause. The command-line entry points print these as one line and exit 2."""


class UserError(Exception):
    """Bad input from the user (config, file, checkpoint, data); the message names the thing and the fix."""

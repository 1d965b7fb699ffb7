"""Errors a user can cause. The command-line entry points print these as one line and exit 2."""


class UserError(Exception):
    """Bad input from the user (config, file, checkpoint, data); the message names the thing and the fix."""


# Exit statuses of the entry points besides 0 (done) and 1 (a failure that is not the user's input).
BAD_INPUT = 2    # a UserError: one line on stderr says what to fix
PREEMPTED = 75   # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 with a checkpoint saved; run the same command again

"""UserError: bad input from the user. The CLI prints its message as one line and exits with code 2."""


class UserError(Exception):
    """A problem the user can fix (a wrong path, plan, budget, ...), reported without a traceback."""

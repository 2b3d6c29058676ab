"""Exception types of the deploy package.

``DeployError`` is raised for anything the user can fix (a bad file, a bad
option, an impossible budget). Its message names the value and the fix. The CLI
prints it as one line. ``InternalError`` marks a bug in deploy itself.
"""


class DeployError(Exception):
    """A problem with the user's input or environment, with a message that explains how to fix it."""


class InternalError(RuntimeError):
    """A broken invariant inside deploy; report it as a bug."""

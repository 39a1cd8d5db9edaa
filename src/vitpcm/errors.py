"""User-facing errors.

Anything the user can fix (a missing folder, a bad config key, a checkpoint that does not
fit) is raised as :class:`VitpcmError` with a message that names the thing and the fix.
The CLI prints that message as one line and exits with status 2; everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class VitpcmError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""

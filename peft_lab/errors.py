"""The one exception for user mistakes.

`UserError` says what is wrong, where (file, tensor, parameter) and how to fix it. Library code raises it at
the boundaries (config validation, tree checks, file I/O); only `peft_lab.cli` catches it and prints one
paragraph to stderr with a non-zero exit code. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Your input is wrong; the message says where and how to fix it."""

"""The user's mistakes, as opposed to medcg's bugs: command lines print these as one line, not a traceback.

A `UserError` says what is wrong with a flag, a config key, a path or the data, and what to do about it.
Anything else escaping a command is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
  """A mistake in the input (flags, config, paths, data) the message fully explains."""


def one_line(e: BaseException) -> str:
  """The message of `e` for a command line: its text, the exception's name only if it has none."""
  text = str(e).strip()
  return text or type(e).__name__


class ConfigError(UserError, ValueError):
  """A config value that cannot work (named by its dotted key)."""

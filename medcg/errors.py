"""The user's mistakes, as opposed to medcg's bugs: command lines print these as one line, not a traceback.

A `UserError` says what is wrong with a flag, a config key, a path or the data, and what to do about it.
Anything else escaping a command is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys


class UserError(Exception):
  """A mistake in the input (flags, config, paths, data) the message fully explains."""


def one_line(e: BaseException) -> str:
  """The message of `e` for a command line: its text, the exception's name only if it has none."""
  text = str(e).strip()
  return text or type(e).__name__


class ConfigError(UserError, ValueError):
  """A config value that cannot work (named by its dotted key)."""


# Packages whose exceptions mean the object store could not be reached or refused us (network, credentials,
# permissions), as opposed to a bug: gcsfs and the Google auth / HTTP stacks under it.
_STORE_ERROR_PACKAGES = ("aiohttp", "gcsfs", "google")


def as_user_error(e: BaseException) -> UserError | None:
  """`e` as a UserError to print in one line, or None when it is a bug (keep the traceback).

  Object-store failures (DNS, refused connections, missing credentials, 403s), anywhere in the exception's
  chain, become one line saying what failed and what to check.
  """
  seen = 0
  while e is not None and seen < 8:
    if isinstance(e, UserError):
      return e
    if type(e).__module__.split(".")[0] in _STORE_ERROR_PACKAGES:
      return UserError(f"cannot use the object store: {type(e).__name__}: {one_line(e)} (check the network and "
                       "the credentials: `gcloud auth application-default login`, or the VM's service account)")
    e, seen = e.__cause__ or e.__context__, seen + 1
  return None


def report(e: BaseException, prefix: str) -> bool:
  """A command line's handler: prints `e` as "PREFIX: message" on stderr when it is the user's to fix and
  returns True; returns False for a bug, which the caller re-raises (keeping its traceback)."""
  err = as_user_error(e)
  if err is None:
    return False
  print(f"{prefix}: {one_line(err)}", file=sys.stderr)
  return True

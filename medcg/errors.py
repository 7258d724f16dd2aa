"""The user's mistakes, as opposed to medcg's bugs: command lines print these as one line, not a traceback.

A `UserError` says what is wrong with a flag, a config key, a path or the data, and what to do about it.
Anything else escaping a command is a bug and keeps its traceback.

The command lines' convention: a user error prints one line `<prog>: error: <message>` on stderr and exits 2;
`--verbose` (every command) or the environment variable MEDCG_VERBOSE=1 prints its traceback first. Bad flags
(unknown, missing, a bad value, an unknown `--config.x.y` override) are user errors too.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any, Callable, NoReturn, Sequence

VERBOSE_ENV = "MEDCG_VERBOSE"
USAGE_EXIT = 2  # a user error's exit status, as argparse's


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
  if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):  # a path given that is not there
    return UserError(one_line(e) if e.filename is None or str(e.filename) in str(e)
                     else f"{e.filename}: {e.strerror or one_line(e)}")
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


def verbose(argv: Sequence[str] | None = None) -> bool:
  """Whether user errors keep their traceback: `--verbose` in `argv` (default sys.argv) or MEDCG_VERBOSE=1."""
  argv = sys.argv[1:] if argv is None else argv
  flag = any(a.startswith("-") and a.lstrip("-").lower() in ("verbose", "verbose=true", "verbose=1") for a in argv)
  return flag or os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def fail(prog: str, message: str) -> NoReturn:
  """Prints "PROG: error: MESSAGE" on stderr and exits 2."""
  print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(USAGE_EXIT)


def exit_status(e: BaseException, prog: str, *, verbose_: bool | None = None) -> int | None:
  """A command line's handler: 2 after printing `e` as "PROG: error: message" (its traceback first when
  verbose) when it is the user's to fix; None for a bug, which the caller re-raises."""
  if as_user_error(e) is None:
    return None
  if verbose() if verbose_ is None else verbose_:
    import traceback
    traceback.print_exception(e, file=sys.stderr)
  report(e, f"{prog}: error")
  return USAGE_EXIT


def underscore_name(option: str) -> str:
  """`--image-size` -> `--image_size`: the one spelling of a long flag (absl's, as big_vision and MaxText)."""
  return "--" + option[2:].replace("-", "_") if option.startswith("--") else option


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """The description as written, every option with its default (unless None / False / empty, or its help names one);
  an option is listed by its underscore name only (its dashed alias still parses)."""

  def _format_action_invocation(self, action):
    strings = action.option_strings
    shown = [o for o in strings if not ("-" in o[2:] and o.startswith("--") and underscore_name(o) in strings)]
    if shown != strings:
      action = copy.copy(action)
      action.option_strings = shown
    return super()._format_action_invocation(action)

  def _get_help_string(self, action):
    text = action.help or ""
    if (not action.option_strings or "default" in text.lower()
        or _no_default(action.default)):
      return text
    return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
  """argparse with the convention: defaults in --help, a usage error in one line (exit 2), `--verbose`.

  Long options are spelled with underscores (`--image_size`), as absl's flags in medcg.train / medcg.eval are;
  the dashed spelling (`--image-size`) is accepted too, as it is by those commands. An option with a default but
  no help text still shows its default in --help.
  """

  def __init__(self, *args, verbose_flag: bool = True, **kwargs):
    kwargs.setdefault("formatter_class", HelpFormatter)
    super().__init__(*args, **kwargs)
    if verbose_flag:
      self.add_argument("--verbose", action="store_true",
                        help=f"print a user error's traceback too (or set {VERBOSE_ENV}=1)")

  def add_argument(self, *args, **kwargs):
    args, kwargs = _conventions(args, kwargs)
    return super().add_argument(*args, **kwargs)

  def add_argument_group(self, *args, **kwargs):
    """A --help section whose options follow the same conventions."""
    group = super().add_argument_group(*args, **kwargs)
    plain = group.add_argument

    def add_argument(*args, **kwargs):
      args, kwargs = _conventions(args, kwargs)
      return plain(*args, **kwargs)

    group.add_argument = add_argument
    return group

  def error(self, message: str) -> NoReturn:
    fail(self.prog.removeprefix("python -m "), f"{message}; see --help")


def _no_default(default) -> bool:
  """Nothing worth showing as a default: None, False, an empty string or list (0 is shown)."""
  return default is None or default is False or default is argparse.SUPPRESS or (
      isinstance(default, (str, list)) and not default)


def _conventions(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
  """ArgumentParser.add_argument's (args, kwargs) with its conventions: both spellings of a long option, and a
  default shown in --help when the option has no help text."""
  kwargs = dict(kwargs)
  if args and all(a.startswith("--") for a in args):
    names = []
    for name in map(underscore_name, args):  # the underscore name first (argparse's dest and --help come from it)
      names += [name, "--" + name[2:].replace("_", "-")]
    args = tuple(dict.fromkeys(names))
  default = kwargs.get("default")
  if args and args[0].startswith("-") and kwargs.get("help") is None and not (
      _no_default(default)):
    kwargs["help"] = "default: %(default)s"
  return args, kwargs


def positive_int(text: str) -> int:
  """An argparse type: an integer >= 1."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
  return value


# --- absl command lines -------------------------------------------------------------------------------------

_HELP = ("-h", "-?", "--help", "-help", "--helpshort", "-helpshort", "--helpfull", "-helpfull", "--helpxml")


def _config_flag_error(e: BaseException) -> str | None:
  """The message for a config flag's user error that ml_collections raises bare while absl parses the flags (an
  unknown `--config.a.b` override: KeyError / AttributeError; an unknown config arg: KeyError; a UserError of
  the config file), found by the traceback's config_flags frames; None for anything else (a bug: re-raise)."""
  import re
  tb, frames = e.__traceback__, []
  while tb is not None:
    if tb.tb_frame.f_code.co_filename.endswith("config_flags.py"):
      frames.append((tb.tb_frame.f_code.co_name, tb.tb_frame.f_locals))
    tb = tb.tb_next
  inner = e.args[0] if isinstance(e, AttributeError) and e.args and isinstance(e.args[0], KeyError) else e
  text = str(inner.args[0]) if isinstance(inner, KeyError) and inner.args else one_line(inner)
  for code, where in frames:  # an override: config_flags names it `field_path` or `override`
    path = where.get("field_path", where.get("override"))
    if isinstance(path, str) and isinstance(e, (KeyError, AttributeError, IndexError)):
      name = getattr(where.get("self"), "name", "config")
      parts = path.split(".")
      missing = re.match(r"""^['"]?([^'"\n]+)['"]?""", text)
      i = parts.index(missing.group(1)) if missing and missing.group(1) in parts else len(parts) - 1
      hint = re.search(r'Did you mean "([^"]+)"', text)
      hint = f' (did you mean "{hint.group(1)}"?)' if hint else ""
      key = "" if i == len(parts) - 1 else f" {parts[i]!r}"
      return f"--{name}.{path}: no such key{key} in {'.'.join([name] + parts[:i])}{hint}"
  for code, where in frames:  # the config file's get_config(arg) refused its arg
    if code == "parse" and isinstance(where.get("path"), str) and isinstance(e, (KeyError, UserError)):
      return f"--config={where['path']}: {text}"
  return None


def _config_load_error(flags_module) -> str | None:
  """config_flags keeps a config file it could not load as a placeholder that fails when used: a message for
  the first such flag, else None."""
  for name in flags_module.FLAGS:
    value = flags_module.FLAGS[name].value
    if type(value).__name__ == "_ErrorConfig":
      reason = str(getattr(value, "__dict__", {}).get("_error", "")).strip().splitlines()
      return f"--{name}: cannot load the config file: {reason[-1].strip() if reason else 'unknown error'}"
  return None


def _unwrap_flag_error(e: BaseException) -> str:
  """absl's message for a bad flag; a config file's ValueError (which config_flags re-raises with the whole
  traceback as its message) as its own first line."""
  seen, cur = 0, e
  while cur is not None and seen < 8:
    if str(cur).startswith("Error whilst parsing config file") and cur.__context__ is not None:
      head = one_line(e).split(": Error whilst parsing config file", 1)[0]
      return f"{head}: {one_line(cur.__context__).splitlines()[0]}"
    cur, seen = cur.__cause__ or cur.__context__, seen + 1
  return " ".join(one_line(e).split())


def dashes_to_underscores(argv: Sequence[str]) -> list[str]:
  """An absl `prepare` step: `--batch-size 8` means `--batch_size 8` (absl flag names use underscores), so every
  medcg command takes both spellings. Only flag names change: values, and a `--config.a.b=v` key, are left."""
  fixed = [argv[0]]
  for arg in argv[1:]:
    if arg == "--":  # absl: everything after it is positional
      fixed += argv[len(fixed):]
      break
    if arg.startswith("--") and not arg.startswith("---") and not arg.startswith("--config."):
      name, eq, value = arg[2:].partition("=")
      arg = "--" + name.replace("-", "_") + eq + value
    fixed.append(arg)
  return fixed


def define_verbose_flag() -> None:
  """absl's `--verbose`: a user error prints its traceback too (as MEDCG_VERBOSE=1)."""
  from absl import flags
  caller = sys._getframe(1).f_globals.get("__name__", "__main__")  # listed with the caller's flags in --help
  flags.DEFINE_bool("verbose", False, f"Print a user error's traceback too (or set {VERBOSE_ENV}=1).",
                    module_name=sys.argv[0] if caller == "__main__" else caller)


def absl_flags_parser(prog: str, prepare: Callable[[list[str]], list[str]] | None = dashes_to_underscores
                      ) -> Callable[[list[str]], Any]:
  """A `flags_parser` for `absl.app.run` with the convention: --help (the module's flags and their defaults)
  exits 0; a bad flag, a missing required one or an unknown `--config.x` override is one line, exit 2.
  `prepare` rewrites argv first. `--verbose` / MEDCG_VERBOSE=1 print the error's traceback too."""
  from absl import flags

  def parse(argv: list[str]) -> Any:
    argv, error = prepare(list(argv)) if prepare else list(argv), None
    try:
      out = flags.FLAGS(argv)
      message = _config_load_error(flags)
      if message is None:
        return out
    except SystemExit as e:  # absl's help flags exit 1 after printing the help: asking for help is no error
      if e.code == 1 and any(a.split("=")[0] in _HELP for a in argv[1:]):
        sys.exit(0)
      raise
    except flags.Error as e:
      message, error = _unwrap_flag_error(e), e
    except Exception as e:
      message, error = _config_flag_error(e), e
      if message is None:
        raise
    if verbose(argv[1:]) and error is not None:
      import traceback
      traceback.print_exception(error, file=sys.stderr)
    fail(prog, f"{message}; see --help")

  return parse

"""What every launcher does with bad flags and bad input: one line on stderr and a non-zero exit, no traceback.

`launch/*.py` call `cli.run(main)` instead of `absl.app.run(main)`. Exit status 2: the command line is
wrong (an unknown flag or config field, a bad value, a config that fails its checks, a workdir held by
another run); status 1: the input is (a missing or corrupt file, a dataset that is not there, an
unusable query). A config problem prints one `config error: ...` line per problem; any other problem one
`error: ...` line. `--verbose` re-raises instead, with the traceback. An exception that is not bad input
(a bug) keeps its traceback.

Why a parser of our own: ml_collections applies `--config.a.b=v` overrides while absl parses the flags, and
an unknown field escapes as a 50-line AttributeError / KeyError from inside it. `parse_flags` turns that
into one line naming the field and the closest existing ones.
"""
from __future__ import annotations

import difflib
import re
import sys

from absl import app
from absl import flags

VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, raise it with its traceback instead of one line.")

EXIT_USAGE = 2
EXIT_ERROR = 1


def one_line(e: BaseException) -> str:
  """An exception's message on one line (KeyError's quotes dropped)."""
  text = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
  return " ".join(text.split()) or type(e).__name__


def _fail(line: str, code: int):
  print(line, file=sys.stderr)
  sys.exit(code)


# ------------------------------------------------------------------------------------------------------
# Flags and config overrides.


def refuse_flags(names, why: str, flag_values=flags.FLAGS) -> None:
  """UsageError '--a, --b: WHY' when any of the flags `names` was given: a launcher refuses a flag it would
  otherwise ignore (one of another sub-command, or of a mode that takes the value from elsewhere)."""
  given = [f"--{n}" for n in names if flag_values[n].present]
  if given:
    raise app.UsageError(f"{', '.join(given)}: {why}")


def _config_flag_names(flag_values) -> list[str]:
  """The flags defined by `config_flags.DEFINE_config_file`."""
  from ml_collections.config_flags import config_flags as impl
  return [name for name in flag_values
          if impl.is_config_flag(flag_values[name]) and isinstance(flag_values[name].parser, impl.ConfigFileFlagParser)]


def _config_file_arg(flag_values, name: str, argv: list[str]) -> str | None:
  """The `--name=path[:arg]` of argv (the last one), else the flag's default path."""
  found = None
  for i, arg in enumerate(argv):
    m = re.match(rf"^-{{1,2}}{re.escape(name)}(=(.*))?$", arg)
    if m:
      found = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  if found is None:
    default = getattr(flag_values[name], "default_as_str", None) or ""
    found = default.strip("'\"") or None
  return found


def _paths(config, prefix: str = "") -> list[str]:
  out = []
  for key in config.keys():
    path = f"{prefix}{key}"
    out.append(path)
    value = config[key]
    if hasattr(value, "keys") and callable(value.keys):
      out.extend(_paths(value, path + "."))
  return out


def unknown_field(config, name: str, field: str) -> str | None:
  """One line when `field` (dotted, without the flag name) is not a field of `config`, else None: what is
  missing and the closest existing fields (siblings first, then same-named fields elsewhere)."""
  node, walked = config, []
  for part in field.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") and callable(node.keys) else None
    if keys is not None and part in keys:
      node = node[part]
      walked.append(part)
      continue
    where = ".".join([name] + walked)
    if keys is None:
      return f"--{name}.{field}: {where} is a value, not a group of fields"
    prefix = "".join(f"{w}." for w in walked)
    close = [prefix + k for k in difflib.get_close_matches(part, keys, n=3, cutoff=0.6)]
    for path in _paths(config):  # the same name under another group: --config.train.temperature -> loss.
      tail = path.rsplit(".", 1)[-1]
      if path not in close and difflib.SequenceMatcher(None, part, tail).ratio() >= 0.8:
        close.append(path)
    if not close:
      close = [prefix + k for k in difflib.get_close_matches(part, keys, n=3, cutoff=0.0)]
    hint = f"; closest: {', '.join(f'--{name}.{c}' for c in close[:3])}" if close else ""
    return f"--{name}.{field}: {where} has no field {part!r}{hint}"
  return None


def _override_problem(flag_values, argv: list[str]) -> str | None:
  """The first override in argv naming no field of its loaded config (one line), or None."""
  for name in _config_flag_names(flag_values):
    problem = _problem_in(name, _config_file_arg(flag_values, name, argv), argv)
    if problem:
      return problem
  return None


def _problem_in(name: str, path: str | None, argv: list[str]) -> str | None:
  """What is wrong with config file `path` of flag `name`, or with an override of it in argv (one line)."""
  from ml_collections.config_flags import config_flags as impl
  if not path:
    return None
  try:
    config = impl.ConfigFileFlagParser(name, lock_config=False).parse(path)
  except Exception as e:  # the config file itself fails: reported as that
    return f"--{name}={path}: {_last_line(e)}"
  if type(config).__name__ == "_ErrorConfig":
    return f"--{name}={path}: {_last_line(config._error)}"
  for arg in argv:
    m = re.match(rf"^-{{1,2}}(?:no)?{re.escape(name)}\.([^=]+)", arg)
    if m:
      problem = unknown_field(config, name, m.group(1))
      if problem:
        return problem
  return None


def define_config_file(name: str, default: str | None, help_string: str, **kwargs):
  """`config_flags.DEFINE_config_file`. A flag with a default path parses it, with sys.argv's overrides, right
  here (at import, before `run`): an unknown field there is one line and status 2 too."""
  from ml_collections import config_flags
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
  except Exception as e:
    if "--verbose" in sys.argv:
      raise
    _fail(f"config error: {_problem_in(name, default, sys.argv) or one_line(e)}", EXIT_USAGE)


def _last_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[-1] if lines else type(e).__name__


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every failure as one line and exit status 2."""
  flag_values = flags.FLAGS
  verbose = any(a in ("--verbose", "-verbose", "--verbose=true", "--verbose=True") for a in argv)
  try:
    rest = flag_values(argv)
  except flags.Error as e:
    if verbose:
      raise
    _fail(f"usage error: {one_line(e)}", EXIT_USAGE)
  except Exception as e:  # ml_collections: an unknown config field escapes as AttributeError / KeyError
    if verbose:
      raise
    _fail(f"config error: {_override_problem(flag_values, argv) or one_line(e)}", EXIT_USAGE)
  # Config files load lazily: a missing or broken one would otherwise surface as a traceback at first use.
  for name in _config_flag_names(flag_values):
    value = flag_values[name].value
    if type(value).__name__ == "_ErrorConfig":
      _fail(f"config error: --{name}: {_last_line(value._error)}", EXIT_USAGE)
  return rest


# ------------------------------------------------------------------------------------------------------
# Errors while running.


def classify(e: BaseException) -> tuple[int, list[str]] | None:
  """(exit status, lines) for bad input; None for anything else (a bug: keep the traceback)."""
  from vldeformer_jax.io.workdir import WorkdirLocked
  from vldeformer_jax.training.config_checks import ConfigError
  if isinstance(e, ConfigError):
    return EXIT_USAGE, [f"config error: {line}" for line in e.errors]
  if isinstance(e, WorkdirLocked):
    return EXIT_USAGE, [f"error: {one_line(e)}"]
  if isinstance(e, app.UsageError):
    return EXIT_USAGE, [f"usage error: {one_line(e)}"]
  if isinstance(e, (OSError, ValueError, KeyError)):
    return EXIT_ERROR, [f"error: {one_line(e)}"]
  return None


def guarded(main):
  """`main` with bad input reported by `classify` (unless --verbose)."""

  def wrapped(argv):
    try:
      return main(argv)
    except Exception as e:
      verdict = None if VERBOSE.value else classify(e)
      if verdict is None:
        raise
      code, lines = verdict
      for line in lines:
        print(line, file=sys.stderr)
      sys.exit(code)

  return wrapped


def run(main) -> None:
  """`absl.app.run(main)` with one-line errors (see the module docstring)."""
  app.run(guarded(main), flags_parser=parse_flags)

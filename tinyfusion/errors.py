"""User-facing errors: every CLI turns them into one line on stderr and a non-zero exit."""
import argparse
import copy
import functools
import os
import sys


on_exit = []  # callables run when a CLI entry point returns or fails (run_folder's lock release)


class UserError(Exception):
    """Bad input the user can fix; the message is the whole story, no traceback."""


def cli(main):
    """Wrap a CLI entry point: UserError (and interrupted runs) end with one line and exit code 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        finally:
            for f in list(on_exit):  # a callable may remove itself
                f()

    return wrapper


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description kept as written, and every option's default shown where its help does not already
    say it (a default of None or False means "not given" and is left out)."""

    @staticmethod
    def default_text(action):
        default = action.default
        if not action.option_strings or default is None or default is False or default == argparse.SUPPRESS:
            return None
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return None
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"(default: {shown.replace('%', '%%')})"

    def _format_action(self, action):
        if not action.help and self.default_text(action):  # argparse prints nothing for an option without help
            action = copy.copy(action)
            action.help = self.default_text(action)
        return super()._format_action(action)

    def _get_help_string(self, action):
        text, default = action.help or "", self.default_text(action)
        if default and "default" not in text.lower():
            return f"{text} {default}"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), help text kept as written, defaults shown."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def read_json(path, what="a JSON object"):
    """A JSON object from a file a user gave or may have edited: a missing, unreadable, corrupt or non-object
    file is one UserError line, not a JSONDecodeError traceback."""
    import json

    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not {what}")
    return data


def positive(kind=int):
    """argparse type for strictly positive numbers."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def writable_file(path):
    """Fail early (before any work) when the output file's folder cannot be created or written, without
    creating anything: a run refused for bad input leaves no empty folder behind."""
    if os.path.isdir(path):  # found at the final rename otherwise, after all the work
        raise UserError(f"{path} is a folder; give a file path for the output")
    folder = os.path.dirname(os.path.abspath(path))
    probe = folder
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"cannot create output folder {folder}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output folder {folder} is not writable" if probe == folder else
                        f"cannot create output folder {folder}: {probe} is not writable")
    return path

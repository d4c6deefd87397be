"""The console script itself: every option documented with its default, `--version`, and `python -m hybridize`."""

import argparse
import subprocess
import sys

import pytest

from hybridize import __version__
from hybridize.cli import COMMANDS, HelpFormatter, build_parser


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser(name)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help_and_shows_its_default(name):
    sub = _subparser(name)
    formatter = HelpFormatter(prog=name)
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{name} {label}: no help text"
        shown = formatter._get_help_string(action)
        if action.option_strings and action.default not in (None, False, [], ()):
            assert "default" in shown, f"{name} {label}: the default {action.default!r} is not shown"
    sub.format_help()  # every help string formats (a stray % would raise here)


def test_version_and_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "hybridize", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"hybridize {__version__}"

"""Every command explains itself."""

import argparse

import pytest

from ecohelp import khofs

COMMANDS = [["mount"], ["umount"], ["kexec"], ["dump"], ["map"], ["status"], ["ctl"], ["ctl", "M", "mem"],
            ["ctl", "M", "subtree"]]


def test_top_level_help():
    r = khofs("--help")
    assert r.returncode == 0
    for cmd in ("mount", "umount", "kexec", "dump", "status", "ctl"):
        assert f"    {cmd}" in r.stdout
    assert "Exit status: 0 success, 1 failure" in r.stdout


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_subcommand_help(cmd):
    r = khofs(*cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: khofs")


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_argument_has_help():
    from khofs.cli import build_parser
    missing = []
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                names = {a.dest for a in action._choices_actions}
                missing += [f"{parser.prog} {n}" for n in action.choices if n not in names]
            elif action.help is None and action.dest != "help":
                missing.append(f"{parser.prog} {action.dest}")
    assert missing == []


def test_no_command_is_a_usage_error():
    r = khofs()
    assert r.returncode == 2 and "usage: khofs" in r.stderr

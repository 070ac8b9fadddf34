"""Every command's help lists every option with a line of help, and shows an example."""

from __future__ import annotations

import argparse

from blockfs.cli.main import build_parser


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.extend(_commands(sub, (*path, name)))
    return found


def test_every_command_documents_every_option_with_an_example() -> None:
    commands = _commands(build_parser())
    assert len(commands) > 15  # mount, umount, create, snapshot, info, map, check, job ...
    for path, parser in commands:
        text = parser.format_help()
        assert "example" in text, f"blockfs {' '.join(path)} --help shows no example"
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if action.help == argparse.SUPPRESS:
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help, f"blockfs {' '.join(path)}: {name} has no help"

"""`af3trt <command>`: every command dispatches to a module whose --help works."""

from __future__ import annotations

import pytest

from af3trt import cli


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_unknown_command_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["nope"])
    assert e.value.code == 2 and "af3trt build" in capsys.readouterr().out

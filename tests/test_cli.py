"""The one ``atlasflow`` parser tree: every command resolves to its module's flags and runner."""

from __future__ import annotations

import importlib

import pytest

from atlasflow.cli.main import COMMANDS, build_parser, main


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_command_declares_its_flags_and_runs_through_one_function(command, capsys):
    module = importlib.import_module(command.module)
    name = command.name.replace("-", "_")
    assert callable(getattr(module, f"add_{name}_arguments"))
    assert callable(getattr(module, f"run_{name}"))
    with pytest.raises(SystemExit) as exit_:
        main([command.name, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: atlasflow {command.name} ")


@pytest.mark.parametrize("command", ["register", "report subject"])
def test_qc_flags_have_one_spelling_and_keep_the_old_one_hidden(command, capsys):
    with pytest.raises(SystemExit):
        main([*command.split(), "--help"])
    text = capsys.readouterr().out
    assert "--max-folding-fraction" in text and "--min-ncc-after" in text
    assert "--max-folding " not in text and "--min-ncc " not in text
    required = {
        "register": ["--fixed", "f", "--moving", "m"],
        "report subject": ["--outdir", "o", "--subject", "1", "--sessions", "1", "--out", "x"],
    }[command]
    base = [*command.split(), *required]
    old = vars(build_parser().parse_args([*base, "--max-folding", "0.01", "--min-ncc", "0.3"]))
    new = vars(
        build_parser().parse_args(
            [*base, "--max-folding-fraction", "0.01", "--min-ncc-after", "0.3"]
        )
    )
    assert old == new and old["max_folding_fraction"] == 0.01 and old["min_ncc_after"] == 0.3

"""The command line as a whole: --out and --output alike on every carclf command that writes, and a mistyped
flag or command refused by the command's own parser (carclf's and the make entry points') with the one meant."""

from __future__ import annotations

import importlib

import pytest

from carclf import cli


def output_flags(command: str) -> list[list[str]]:
    """The option strings of each of the command's flags that name where it writes (--out or --output)."""
    parser = cli.parsers(command)[1]
    return [list(a.option_strings) for a in parser._actions if {"--out", "--output"} & set(a.option_strings)]


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_that_writes_takes_out_and_output_alike(command):
    """submit, scan and evaluate say --out, predict and serving-config --output: each takes both."""
    for strings in output_flags(command):
        assert {"--out", "--output"} <= set(strings), (command, strings)


def test_the_commands_that_write_are_the_ones_checked():
    """The parametrized test above must see the flags it is about (an empty list would pass it)."""
    writers = {c for c in cli.COMMANDS if output_flags(c)}
    assert {"submit", "scan", "evaluate", "crossval", "pseudo-label", "bench", "predict", "serving-config",
            "ensemble-config"} <= writers


def test_either_spelling_writes_the_file(tmp_path, capsys):
    """Run for real both ways: serving-config (whose flag is --output) given --out, and a repository of one
    model version; then --output, the same file again."""
    (tmp_path / "repo" / "cars" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "cars" / "1" / "saved_model.pb").write_bytes(b"")
    for flag, name in (("--out", "a.config"), ("--output", "b.config")):
        assert cli.main(["serving-config", "--repository", str(tmp_path / "repo"), flag, str(tmp_path / name)]) == 0
    assert 'name: "cars"' in (tmp_path / "a.config").read_text()
    assert (tmp_path / "a.config").read_text() == (tmp_path / "b.config").read_text()


@pytest.mark.parametrize("argv,unrecognized,hint", [
    (["serving-config", "--outt", "{tmp}/m.config"], "--outt {tmp}/m.config", " (did you mean --out?)"),
    (["serve", "--model-name", "cars", "--model_base_path", "{tmp}"], "--model-name cars",
     " (did you mean --model_name?)"),
    (["predict", "{tmp}", "--sever", "grpc://127.0.0.1:1", "--batchsize=3"], "--sever grpc://127.0.0.1:1 --batchsize=3",
     " (did you mean --server for --sever, --batch-size for --batchsize?)"),
    (["scan", "{tmp}", "--zzzz"], "--zzzz", ""),
])
def test_a_mistyped_flag_is_refused_by_its_command_naming_the_flag_meant(tmp_path, capsys, argv, unrecognized,
                                                                         hint):
    """The command's own usage (not carclf's), every word it did not take, the closest flag when one is close,
    status 2, and nothing run: no file written, no model loaded, no request sent."""
    with pytest.raises(SystemExit) as exited:
        cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: carclf {argv[0]} "), err
    expected = f"carclf {argv[0]}: error: unrecognized arguments: {unrecognized.replace('{tmp}', str(tmp_path))}{hint}"
    assert err.strip().splitlines()[-1] == expected
    assert list(tmp_path.iterdir()) == []


def test_a_word_before_any_command_is_refused_by_carclf_itself(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--verbose"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: carclf [-h] COMMAND") and "carclf: error: unrecognized arguments: --verbose" in err


@pytest.mark.parametrize("word,hint", [
    ("sumbit", " (did you mean submit?)"),
    ("serving_config", " (did you mean serving-config?)"),
    ("frobnicate", ""),
])
def test_an_unknown_command_is_named_with_the_command_meant_and_every_command(capsys, word, hint):
    assert cli.main([word, "x"]) == 2
    err = capsys.readouterr().err
    assert err == f"carclf: unknown command {word!r}{hint}; expected one of {', '.join(cli.COMMANDS)}\n"


@pytest.mark.parametrize("module,argv,meant", [
    ("carclf.loadtest.run", ["--user=3"], "--users"),
    ("carclf.loadtest.run", ["--reprts={tmp}"], "--reports"),
    ("carclf.loadtest.soak", ["--user=3"], "--users"),
    ("carclf.demo", ["--skip-trainin"], "--skip-training"),
    ("carclf.demo", ["--repo={tmp}"], "--repository"),
])
def test_the_make_entry_points_refuse_abbreviated_and_mistyped_flags_alike(module, argv, meant, capsys, tmp_path):
    """``make loadtest ARGS=...`` and ``make demo`` parse their flags as the carclf commands do: a prefix of a flag
    is not taken for it (``--user`` for ``--users``), and a mistyped flag is answered with the one meant."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(module).main(argv)
    assert exited.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == f"python -m {module}: error: unrecognized arguments: {argv[0]} (did you mean {meant}?)"
    assert list(tmp_path.iterdir()) == []


class _Built(Exception):
    """Raised by the patched parse_args with the parser an entry point built."""

    def __init__(self, parser):
        super().__init__("built")
        self.parser = parser


def _flags_without_help(parser) -> list[str]:
    return [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_flag_of_every_command_says_what_it_is_for(command):
    assert _flags_without_help(cli.parsers(command)[1]) == [], command


@pytest.mark.parametrize("module", ["carclf.ensemble.evaluate", "carclf.loadtest.run", "carclf.loadtest.soak",
                                    "carclf.loadtest.ab", "carclf.demo"])
def test_every_flag_of_the_python_m_entry_points_says_what_it_is_for(module, monkeypatch):
    """The parser each ``python -m`` entry point builds, caught as it parses (nothing runs)."""
    def caught(self, *args, **kwargs):
        raise _Built(self)

    monkeypatch.setattr(cli.CommandParser, "parse_args", caught)
    monkeypatch.setattr(cli.CommandParser, "parse_known_args", caught)
    entry = importlib.import_module(module)
    with pytest.raises(_Built) as built:
        entry.parser().parse_args([]) if hasattr(entry, "parser") else entry.main([])
    assert _flags_without_help(built.value.parser) == [], module

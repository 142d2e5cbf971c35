"""The ``carclf`` command line: one entry point, one sub-command module per concern.

Each sub-command lives beside the code it drives and exposes ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so ``carclf --help`` is fast.
Errors of the product's hierarchy print one clear line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import signal
import stat
import sys
from typing import NoReturn

from carclf.errors import CarClfError, os_error_line

# command -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "backbones": ("carclf.train.commands.backbones", "list the registered backbones"),
    "scan": ("carclf.train.commands.scan", "scan a data folder: bad files report and EDA"),
    "train": ("carclf.train.commands.train", "train a recipe (staged transfer learning)"),
    "crossval": ("carclf.train.commands.crossval", "pool the fold runs of a k-fold cross-validation"),
    "evaluate": ("carclf.train.commands.evaluate", "evaluate a run or SavedModel, with and without TTA"),
    "submit": ("carclf.train.commands.submit", "write a Kaggle submission CSV for a folder of photos"),
    "pseudo-label": ("carclf.train.commands.pseudo_label", "label unlabelled photos with confident predictions"),
    "export": ("carclf.train.commands.export", "export a run as the next SavedModel version"),
    "serve": ("carclf.serving.commands.serve", "run the embedded TF-Serving-compatible model server"),
    "serving-config": ("carclf.serving.commands.serving_config", "write models.config from a model repository"),
    "ensemble-config": ("carclf.ensemble.commands.ensemble_config",
                        "write an ensemble's config.pbtxt over served backbones"),
    "gateway": ("carclf.ensemble.commands.gateway", "serve ensembles in front of a real TF Serving"),
    "predict": ("carclf.clients.commands.predict", "classify photos through a server (gRPC or REST)"),
    "bench": ("carclf.loadtest.bench", "benchmark in-process vs gRPC vs REST vs ensemble"),
}


class CommandParser(argparse.ArgumentParser):
    """The parser of a command (a ``carclf`` sub-command, or an entry point such as ``python -m
    carclf.loadtest.run``): no abbreviated flags, and a mistyped flag is answered with the closest one."""

    def __init__(self, **kwargs) -> None:
        # no abbreviated flags: a prefix such as --batching_param must not pass for --batching_parameters_file
        super().__init__(allow_abbrev=False, **kwargs)

    def parse_args(self, args=None, namespace=None):  # as an entry point's parser; carclf's own uses main's
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.refuse_unrecognized(extra)
        return parsed

    def refuse_unrecognized(self, extra: list[str]) -> NoReturn:
        """Exit with status 2 and this command's usage, naming what it does not take and, for each mistyped
        flag, the flag it may have meant (``--out`` for ``--outt``, ``--model_name`` for ``--model-name``)."""
        flags = [flag for action in self._actions for flag in action.option_strings]
        meant: dict[str, str] = {}
        for token in extra:
            name = token.split("=", 1)[0]
            close = difflib.get_close_matches(name, flags, n=1) if name.startswith("-") else []
            if close:
                meant[name] = close[0]
        message = f"unrecognized arguments: {' '.join(extra)}"
        if len(meant) == 1:
            message += f" (did you mean {next(iter(meant.values()))}?)"
        elif meant:
            message += f" (did you mean {', '.join(f'{flag} for {name}' for name, flag in meant.items())}?)"
        self.error(message)


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The ``carclf`` parser, with the arguments of the ``selected`` command only (the others are not imported)."""
    return parsers(selected)[0]


def parsers(selected: str | None) -> tuple[argparse.ArgumentParser, CommandParser | None]:
    """``build_parser``'s parser, and the ``selected`` command's own (None when no command is selected)."""
    parser = argparse.ArgumentParser(prog="carclf", description="Car-model photo classifier and serving stack")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    command_parser = None
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            importlib.import_module(module_name).add_arguments(p)
            command_parser = p
    return parser, command_parser


def stdout_is_a_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)
    except (OSError, ValueError):  # no file descriptor (a test's captured stdout)
        return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    selected = next((a for a in argv if not a.startswith("-")), None)
    if selected is not None and selected not in COMMANDS:
        meant = "".join(f" (did you mean {c}?)" for c in difflib.get_close_matches(selected, COMMANDS, n=1))
        print(f"carclf: unknown command {selected!r}{meant}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    parser, command_parser = parsers(selected)
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser: its usage, and the flags a typo may have meant
        if command_parser is None:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        command_parser.refuse_unrecognized(extra)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except CarClfError as exc:
        print(f"carclf {args.command}: error: {exc.message}", file=sys.stderr)
        return 2
    except BrokenPipeError as exc:
        if not stdout_is_a_pipe():
            print(f"carclf {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
            return 2
        # the reader of stdout left (`carclf predict ... | head -1`): stop quietly with SIGPIPE's status, as
        # Unix tools do; stdout goes to /dev/null so that the flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as exc:
        print(f"carclf {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"carclf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``carclf`` command line: one entry point, one sub-command module per concern.

Each sub-command lives beside the code it drives and exposes ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so ``carclf --help`` is fast.
Errors of the product's hierarchy print one clear line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import stat
import sys

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
    "gateway": ("carclf.ensemble.commands.gateway", "serve ensembles in front of a real TF Serving"),
    "predict": ("carclf.clients.commands.predict", "classify photos through a server (gRPC or REST)"),
    "bench": ("carclf.loadtest.bench", "benchmark in-process vs gRPC vs REST vs ensemble"),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carclf", description="Car-model photo classifier and serving stack")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        # no abbreviated flags: a prefix such as --batching_param must not pass for --batching_parameters_file
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        if name == selected:
            importlib.import_module(module_name).add_arguments(p)
    return parser


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
        print(f"carclf: unknown command {selected!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    parser = build_parser(selected)
    args = parser.parse_args(argv)
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

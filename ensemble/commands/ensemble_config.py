"""``carclf ensemble-config``: write the Triton-style ``config.pbtxt`` of an ensemble over served backbones.

The text is built with Triton's schema (``carclf.ensemble.config.render``) and checked by the parser the
servers use (``parse_config``) before anything is written, so a file it writes loads; a bad member, version or
parameter is refused naming it. With ``--repository`` each member must also have the version asked for there,
with a model card that gives its input size (what ``carclf serve --model_repository`` will read).
"""

from __future__ import annotations

import argparse

from carclf import contract
from carclf.destinations import STDOUT, check_file, write_or_print
from carclf.ensemble.config import parse_config, render
from carclf.ensemble.members import info_from_repository
from carclf.errors import ConfigError

SOURCE = "the config it would write"  # how parse_config's errors name what they are about
HEADER = ("# Triton-style ensemble config (carclf serve --ensemble_config_file, carclf gateway), written by\n"
          "# `carclf ensemble-config`; its parameters are listed in ensemble/README.md.\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("members", nargs="+", metavar="MEMBER[:VERSION]",
                        help="served backbones whose probabilities are averaged; :VERSION pins a version "
                             "(default: the latest)")
    parser.add_argument("--name", default="car_ensemble", help="the ensemble's model name (default %(default)s)")
    parser.add_argument("--tta", help="TTA policy of the views each member sees: none, hflip or hflip_crops "
                                      "(default: none)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="another parameter of ensemble/README.md, e.g. aggregation=geometric_mean, "
                             "weight.<member>=2, failure_policy=degrade; repeatable")
    parser.add_argument("--repository", help="model repository where every member must have the version asked "
                                             "for, with its model card")
    parser.add_argument("--output", "--out", default="-",
                        help="file to write ('-': standard output), e.g. ensembles/car_ensemble/config.pbtxt")


def parse_members(words: list[str]) -> dict[str, int]:
    """``name`` or ``name:version`` -> {name: version, -1 for the latest}; a member named twice is refused."""
    members: dict[str, int] = {}
    for word in words:
        name, colon, version = word.partition(":")
        number = contract.version_number(version) if colon else -1
        if not name or number is None or number == 0:
            raise ConfigError(f"member {word!r}: expected NAME or NAME:VERSION with a version >= 1")
        if name in members:
            raise ConfigError(f"member {name!r} is named twice")
        members[name] = number
    return members


def parse_parameters(pairs: list[str], tta: str | None) -> dict[str, str]:
    """``KEY=VALUE`` words (and ``--tta``) -> parameters; a key given twice is refused."""
    parameters: dict[str, str] = {}
    for pair in pairs + ([f"tta_policy={tta}"] if tta is not None else []):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"received {pair!r}; expected KEY=VALUE", source="--param")
        if key in parameters:
            raise ConfigError(f"{key!r} is given twice" + (" (--tta sets tta_policy)" if key == "tta_policy" else ""),
                              source="--param")
        parameters[key] = value
    return parameters


def run(args: argparse.Namespace) -> int:
    if args.output != STDOUT:
        check_file(args.output, "--output")
    text = HEADER + render(args.name, parse_members(args.members),
                           parameters=parse_parameters(args.param, args.tta))
    config = parse_config(text, source=SOURCE)
    if args.repository is not None:
        for member in config.members:
            info_from_repository(args.repository, member)
    write_or_print(args.output, text, f"{config.name} over {', '.join(config.member_names)}")
    return 0

"""``carclf gateway``: serve ensembles over the TF Serving API in front of a real TF Serving.

    carclf gateway --members grpc://tfserving:8500 --model_repository /models \\
        --ensemble_config_file ensemble/car_ensemble/config.pbtxt --port 8600 --rest_api_port 8601

Takes the embedded server's flags (ports, host, monitoring, timeouts, drain) plus where the members are.
``--model_repository`` is read for the members' model cards (input size, labels); without it every member
needs an ``input_size.<member>`` parameter in the ensemble config. Runs until SIGTERM or Ctrl-C, then
drains in-flight requests and exits as ``carclf serve`` does: 0 when they finished within
``--drain_timeout_seconds``, else 1; a second signal during the drain exits at once (1).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from carclf.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from carclf.serving.options import add_arguments as add_server_arguments

    add_server_arguments(parser)
    group = parser.add_argument_group("ensemble gateway")
    group.add_argument("--members", required=True, metavar="URL",
                       help="gRPC address of the TF Serving that hosts the members (grpc://host:8500, grpcs:// for TLS)")
    group.add_argument("--member", action="append", default=[], metavar="NAME=URL",
                       help="a member served elsewhere (repeatable), e.g. mobilenet_v2_288=grpc://other:8500")
    group.add_argument("--members_root_cert", type=Path, default=None, help="PEM root certificates for grpcs://")


def parse_member_urls(items: list[str]) -> dict[str, str]:
    urls = {}
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise ConfigError(f"expected NAME=URL, received {item!r}", source="--member")
        urls[name] = url
    return urls


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from carclf.clients.base import read_root_cert
    from carclf.ensemble.gateway import Gateway
    from carclf.serving.commands.serve import serve_until_signalled
    from carclf.serving.options import ServerOptions

    if not args.ensemble_config_file:  # before the server's own "nothing to serve", which names other flags
        raise ConfigError("the gateway serves ensembles: give at least one --ensemble_config_file",
                          source="--ensemble_config_file")
    member_urls = parse_member_urls(args.member)
    root_cert = read_root_cert(args.members_root_cert, "--members_root_cert")
    options = ServerOptions.from_args(args)
    return serve_until_signalled(lambda: Gateway(options, args.members, member_urls=member_urls,
                                                 root_certificates=root_cert).start(),
                                 logging.getLogger("carclf.ensemble"))

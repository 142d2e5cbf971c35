"""The ensemble in front of a real TF Serving: the embedded server's transports, members over gRPC.

``Gateway`` is ``carclf.serving``'s ModelServer (same gRPC and REST adapters, metrics, drain on SIGTERM,
readiness) whose ensembles call their members through ``GrpcClient`` instead of the in-process
predictor. It serves ``car_ensemble`` with the TF Serving API, so any TF Serving client (and the load
tests) calls it like a backbone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from carclf import sources
from carclf.clients.base import parse_server_url
from carclf.ensemble.config import load_config
from carclf.ensemble.members import GrpcMemberCaller
from carclf.ensemble.runtime import EnsembleRuntime
from carclf.ensemble.servable import EnsembleServable
from carclf.errors import ConfigError, InvalidInput
from carclf.serving.options import ServerOptions
from carclf.serving.servable import Servable
from carclf.serving.server import ModelServer


def member_address(url: str, field: str = "--members") -> tuple[str, bool]:
    """``(host:port, tls)`` of a member URL, ``grpc://host:port`` or ``grpcs://`` for TLS; REST URLs (and a bare
    host:port, which reads as REST) are refused, naming ``field``, the flag that gave ``url``."""
    if url.split("://", 1)[0].lower() not in ("grpc", "grpcs"):
        raise ConfigError(f"members are called over gRPC: expected grpc://host:port, received {url!r}",
                          field=field)
    try:
        _, target, tls = parse_server_url(url)
    except InvalidInput as exc:
        raise ConfigError(exc.message, field=field) from None
    return target, tls


def grpc_client(url: str, root_certificates: bytes | None = None, *, field: str = "--members"):
    """A GrpcClient for a member URL (``member_address``), trusting ``root_certificates`` when given for
    ``grpcs://`` (a plaintext member URL ignores them)."""
    from carclf.clients.grpc_client import GrpcClient

    target, tls = member_address(url, field)
    return GrpcClient(target, tls=tls, root_certificates=root_certificates if tls else None)


def build_ensemble(config_path: str | os.PathLike, members_url: str, *, member_urls: Mapping[str, str] | None = None,
                   model_repository: str | os.PathLike | None = None,
                   root_certificates: bytes | None = None) -> EnsembleServable:
    """The servable of one ensemble config whose members live behind ``members_url`` (or ``member_urls``)."""
    config = load_config(config_path)
    unknown = set(member_urls or {}) - set(config.member_names)
    if unknown:
        raise ConfigError(f"--member names {sorted(unknown)}, which are not members of {config.name!r} "
                          f"({list(config.member_names)})", source=str(config_path), field="--member")
    clients = {name: grpc_client(url, root_certificates, field=f"--member {name}")
               for name, url in (member_urls or {}).items()}
    caller = GrpcMemberCaller(grpc_client(members_url, root_certificates), clients=clients,
                              model_repository=model_repository)
    servable = EnsembleServable(EnsembleRuntime(config, caller))
    servable.warmup()
    return servable


class Gateway(ModelServer):
    """A ModelServer serving only ensembles (plus any local models it is also given) over remote members."""

    def __init__(self, options: ServerOptions, members_url: str, *, member_urls: Mapping[str, str] | None = None,
                 root_certificates: bytes | None = None):
        super().__init__(options)
        self.ensemble_paths = list(self.options.ensemble_config_file)
        if not self.ensemble_paths:
            raise ConfigError("the gateway serves ensembles: give at least one --ensemble_config_file",
                              source="--ensemble_config_file")
        # the configs and addresses are checked now, before TensorFlow starts, each error naming its flag
        self.ensemble_members = {path: load_config(path).member_names for path in self.ensemble_paths}
        self.member_urls = dict(member_urls or {})
        called = {name for names in self.ensemble_members.values() for name in names}
        unknown = sorted(set(self.member_urls) - called)
        if unknown:
            served = "; ".join(f"{path}: {list(names)}" for path, names in self.ensemble_members.items())
            raise ConfigError(f"no ensemble of --ensemble_config_file calls {unknown} ({served})", field="--member")
        member_address(members_url)
        for name, url in self.member_urls.items():
            member_address(url, f"--member {name}")
        self.members_url = members_url
        self.root_certificates = root_certificates

    def static_servables(self) -> list[Servable]:
        """The ensembles, over gRPC members (not in-process ones)."""
        repository = self.options.model_repository or None
        if repository is not None and (why := sources.why_not(repository, "folder")):
            raise ConfigError(f"{str(repository)!r} {why}", source="--model_repository")
        return [build_ensemble(path, self.members_url, model_repository=repository,
                               member_urls={name: url for name, url in self.member_urls.items() if name in members},
                               root_certificates=self.root_certificates)
                for path, members in self.ensemble_members.items()]

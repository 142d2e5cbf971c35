"""Real embedded servers (and gateways) over the tiny fixture models, in-process, on free ports.

Shared by tests/ensemble and tests/clients: ``embedded_server`` starts ``carclf.serving``'s ModelServer
with tiny_a/tiny_b and, optionally, ensemble configs; gRPC and REST are real sockets on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from carclf.ensemble.config import render

TINY_MEMBERS = ("tiny_a", "tiny_b")
TINY_LABELS = {"tiny_a": {"stable": 2, "canary": 1}}  # version labels of the shared server
# The tiny models answer in milliseconds; a generous deadline keeps a loaded CI machine from flaking.
# An ensemble config may list only some outputs: these leave out top-k probabilities and the members' versions,
# probabilities and latencies.
SLIM_OUTPUTS = ("probabilities", "label", "top_k_labels", "member_names", "member_answered", "member_labels")
TINY_ENSEMBLE_PARAMETERS = {"tta_policy": "hflip", "aggregation": "weighted_mean", "weight.tiny_a": "2",
                            "weight.tiny_b": "1", "top_k": "3", "deadline_ms": "20000",
                            "failure_policy": "degrade", "quorum": "1"}


def models_config(repository: Path, names: Sequence[str], labels: Mapping[str, Mapping[str, int]] | None = None) -> str:
    """A ModelServerConfig text proto serving ``names`` from ``repository`` (all versions kept)."""
    parts = ["model_config_list {"]
    for name in names:
        parts.append(f'  config {{ name: "{name}" base_path: "{(repository / name).absolute()}" '
                     'model_platform: "tensorflow" model_version_policy { all {} }')
        for label, version in (labels or {}).get(name, {}).items():
            parts.append(f'    version_labels {{ key: "{label}" value: {version} }}')
        parts.append("  }")
    parts.append("}")
    return "\n".join(parts) + "\n"


def write_ensemble_config(folder: Path, name: str = "tiny_ensemble", members=TINY_MEMBERS,
                          outputs: tuple[str, ...] | None = None, **parameters) -> Path:
    """``folder/name/config.pbtxt`` of an ensemble over ``members`` (every aggregate output unless ``outputs``)."""
    folder = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.pbtxt"
    chosen = {} if outputs is None else {"outputs": outputs}
    path.write_text(render(name, members, parameters={**TINY_ENSEMBLE_PARAMETERS, **parameters}, **chosen),
                    encoding="utf-8")
    return path


@contextlib.contextmanager
def embedded_server(repository: Path, workdir: Path, *, models: Sequence[str] = TINY_MEMBERS,
                    ensembles: Sequence[Path] = (), labels=None, **options) -> Iterator:
    """A started ModelServer (gRPC on server.grpc_port, REST on server.rest_port); stopped on exit."""
    from carclf.serving.options import ServerOptions
    from carclf.serving.server import ModelServer

    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "models.config"
    config.write_text(models_config(repository, models, labels), encoding="utf-8")
    if ensembles:  # the upload page at /ui asks the first ensemble (named by its folder, as in Triton)
        options.setdefault("web_ui_model", Path(ensembles[0]).parent.name)
    server = ModelServer(ServerOptions(
        model_config_file=str(config), model_repository=str(repository), ensemble_config_file=[str(p) for p in ensembles],
        port=0, rest_api_port=-1, host="127.0.0.1", **{"file_system_poll_wait_seconds": 0, **options},
        drain_timeout_seconds=2.0)).start()
    try:
        yield server
    finally:
        server.stop(drain_timeout=2.0)


def grpc_url(server) -> str:
    return f"grpc://127.0.0.1:{server.grpc_port}"


def rest_url(server) -> str:
    return f"http://127.0.0.1:{server.rest_port}"

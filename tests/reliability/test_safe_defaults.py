"""Safe defaults: loopback bind, bounded request sizes on every route, validated model names and base paths
(no path traversal out of the model repository, whether from a file, a flag or a reload request), no unsafe
deserialization anywhere in the product, and pinned dependencies used by `make setup` and CI."""

from __future__ import annotations

import argparse
import ast
import http.client
import ipaddress
import re
import shutil
from pathlib import Path

import grpc
import pytest

from carclf.errors import ConfigError
from tests.reliability.bad_inputs import grpc_predict, strings
from tests.serving.conftest import REPO_ROOT, Rest, start_server

PRODUCT_DIRS = ("carclf", "train", "serving", "ensemble", "clients", "loadtest")
MODEL = "tiny_b"


@pytest.fixture(scope="module")
def repository(tiny_repository_template, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("safe_defaults") / "repository"
    shutil.copytree(tiny_repository_template / MODEL, repo / MODEL)
    return repo


@pytest.fixture(scope="module")
def default_server(repository):
    """A server started with nothing but what to serve: every other setting is the default (the model
    repository is the parent of --model_base_path)."""
    server = start_server(model_name=MODEL, model_base_path=str(repository / MODEL), enable_model_warmup=False)
    yield server
    server.stop(drain_timeout=2)


# ---------------------------------------------------------------------------------------------
# Bind address
# ---------------------------------------------------------------------------------------------

def test_both_ports_listen_on_loopback_only_by_default(default_server):
    import psutil

    from carclf.serving.options import ServerOptions

    assert ServerOptions().host == "127.0.0.1"
    listening: dict[int, set] = {}
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN:
            address = ipaddress.ip_address(conn.laddr.ip)
            listening.setdefault(conn.laddr.port, set()).add(getattr(address, "ipv4_mapped", None) or address)
    for port in (default_server.grpc_port, default_server.rest_port):
        assert listening[port] and all(a.is_loopback for a in listening[port]), (port, listening[port])


@pytest.mark.parametrize("command", ["carclf.serving.commands.serve", "carclf.ensemble.commands.gateway"])
def test_command_lines_default_to_loopback(command):
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(command).add_arguments(parser)
    extra = ["--members", "grpc://127.0.0.1:1"] if command.endswith("gateway") else []
    assert parser.parse_args(extra).host == "127.0.0.1"


# ---------------------------------------------------------------------------------------------
# Request size bounds
# ---------------------------------------------------------------------------------------------

def test_default_request_bounds_on_both_transports(default_server):
    from carclf.serving.options import DEFAULT_MAX_REQUEST_BYTES

    limit = default_server.options.max_request_bytes
    assert limit == DEFAULT_MAX_REQUEST_BYTES == 64 << 20
    # REST: refused from the Content-Length header alone, before a byte of the body is read.
    conn = http.client.HTTPConnection("127.0.0.1", default_server.rest_port, timeout=30)
    try:
        conn.putrequest("POST", f"/v1/models/{MODEL}:predict")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(limit + 1))
        conn.endheaders()
        reply = conn.getresponse()
        assert reply.status == 413 and b"--max_request_bytes" in reply.read()
    finally:
        conn.close()
    # gRPC: the same bound as the receive limit.
    with grpc.insecure_channel(f"127.0.0.1:{default_server.grpc_port}",
                               options=[("grpc.max_send_message_length", 128 << 20)]) as channel:
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(grpc_predict(MODEL, image_bytes=strings(b"x" * (limit + 1))).message, timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert Rest(f"http://127.0.0.1:{default_server.rest_port}").get(f"/v1/models/{MODEL}").status == 200


def test_upload_page_and_images_are_bounded():
    from aiohttp import web

    from carclf import contract
    from carclf.clients.web.app import PageSettings, application_with_page
    from carclf.imaging import probe_image

    class NoApi:  # the page's own bound does not depend on the API behind it
        async def handle(self, request):
            return web.Response()

    assert PageSettings().max_bytes == contract.MAX_IMAGE_BYTES
    assert application_with_page(NoApi())._client_max_size <= 2 * contract.MAX_IMAGE_BYTES + 1024 * 1024
    with pytest.raises(Exception, match="larger than the limit"):
        probe_image(b"\xff\xd8" + bytes(contract.MAX_IMAGE_BYTES))


# ---------------------------------------------------------------------------------------------
# Model names and base paths
# ---------------------------------------------------------------------------------------------

def _reload(server, name: str, base_path: str):
    from google.protobuf import text_format
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc

    request = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(f'model_config_list {{ config {{ name: "{name}" base_path: "{base_path}" '
                      'model_platform: "tensorflow" } }', request.config)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        return model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request, timeout=60)


def _refusals(repo: Path, outside: Path) -> list[tuple[str, str, str]]:
    escape = repo / "escape"
    if not escape.is_symlink():
        escape.symlink_to(outside, target_is_directory=True)
    return [
        ("../etc", str(repo / MODEL), "a model name is"),
        ("tiny/b", str(repo / MODEL), "a model name is"),
        ("", str(repo / MODEL), "a model name is"),
        (MODEL, "/etc", "outside the model repository"),
        (MODEL, f"{repo}/../{repo.name}/{MODEL}", "'..' is not allowed"),
        (MODEL, "/models/../etc", "'..' is not allowed"),
        (MODEL, MODEL, "absolute"),
        (MODEL, "s3://bucket/models/tiny_b", "local folders only"),
        (MODEL, "file:///etc", "local folders only"),
        (MODEL, str(escape), "outside the model repository"),
    ]


def test_reload_requests_cannot_leave_the_model_repository(default_server, repository, tmp_path):
    """Every refused reload names the field and leaves the running config untouched."""
    for name, base_path, needle in _refusals(repository, tmp_path):
        with pytest.raises(grpc.RpcError) as info:
            _reload(default_server, name, base_path)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, base_path, info.value.details())
        assert needle in info.value.details() and "model_config_list.config[0]" in info.value.details()
        assert default_server.manager.model_names() == [MODEL]
    reply = Rest(f"http://127.0.0.1:{default_server.rest_port}").get(f"/v1/models/{MODEL}")
    assert reply.json["model_version_status"][0]["state"] == "AVAILABLE"


def test_config_files_and_flags_cannot_leave_the_model_repository(repository, tmp_path):
    from carclf.serving.config import BasePathResolver, parse_models_config, single_model_config

    resolver = BasePathResolver(repository)
    for name, base_path, needle in _refusals(repository, tmp_path):
        text = f'model_config_list {{ config {{ name: "{name}" base_path: "{base_path}" }} }}'
        with pytest.raises(ConfigError, match=re.escape(needle)) as info:
            parse_models_config(text, resolver, source="models.config")
        assert "models.config" in str(info.value) and "model_config_list.config[0]" in str(info.value)
    with pytest.raises(ConfigError, match="outside the model repository"):
        single_model_config(MODEL, str(tmp_path), resolver)


def test_ensemble_member_names_are_model_names(tmp_path):
    from carclf.ensemble.config import load_config, render

    for bad in ("../tiny_a", "a/b", ".hidden"):
        path = tmp_path / "config.pbtxt"
        path.write_text(render("e", [bad, "tiny_b"]), encoding="utf-8")
        with pytest.raises(ConfigError, match="model_name") as info:
            load_config(path)
        assert repr(bad) in str(info.value)


def test_names_in_urls_are_looked_up_never_opened(default_server):
    rest = Rest(f"http://127.0.0.1:{default_server.rest_port}")
    for path in ("/v1/models/..%2F..%2Fetc%2Fpasswd", "/v1/models/%2Fetc%2Fpasswd/metadata",
                 f"/v1/models/{MODEL}/labels/..%2F..%2Fetc", "/v1/models/../../etc/passwd"):
        reply = rest.get(path)
        assert reply.status in (400, 404) and "error" in reply.json, (path, reply.status, reply.body)
        assert b"root:" not in reply.body


# ---------------------------------------------------------------------------------------------
# Deserialization and dependencies
# ---------------------------------------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
# compose builds the node tree only (no constructor runs); the node classes are plain data.
SAFE_YAML = {"safe_load", "safe_load_all", "safe_dump", "safe_dump_all", "YAMLError", "compose", "MappingNode",
             "SequenceNode", "ScalarNode"}


def unsafe_calls(path: Path) -> list[str]:
    """Places in one source file that could deserialize or execute untrusted data."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    shown = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
    for node in ast.walk(tree):
        where = f"{shown}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any((n or "").split(".")[0] in UNSAFE_MODULES for n in names):
                found.append(f"{where}: imports {names}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "yaml" and node.attr not in SAFE_YAML:
                found.append(f"{where}: yaml.{node.attr}")
            if node.attr in ("read_pickle", "unsafe_load", "full_load"):
                found.append(f"{where}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                found.append(f"{where}: {node.func.id}()")
            for keyword in node.keywords:
                value = getattr(keyword.value, "value", None)
                if (keyword.arg, value) in (("allow_pickle", True), ("shell", True), ("safe_mode", False)):
                    found.append(f"{where}: {keyword.arg}={value}")
    return found


def test_no_unsafe_deserialization_in_the_product():
    files = [p for d in PRODUCT_DIRS for p in (REPO_ROOT / d).rglob("*.py")]
    assert len(files) > 50
    offenders = [line for path in files for line in unsafe_calls(path)]
    assert not offenders, offenders


def test_the_scan_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "unsafe_sample.py"
    sample.write_text("import pickle\nimport yaml\nyaml.load(s)\neval(x)\nnp.load(f, allow_pickle=True)\n"
                      "subprocess.run(c, shell=True)\nyaml.safe_load(s)\n", encoding="utf-8")
    assert len(unsafe_calls(sample)) == 5


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def install_closure(requirements: list[str]) -> set[str]:
    """Every distribution installing ``requirements`` pulls in (from the installed metadata, extras included)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = _normal(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            continue
        for text in dist.requires or []:
            sub = Requirement(text)
            wanted = sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (requirement.extras or {""}))
            if wanted:
                todo.append(sub)
    return seen


def test_dependencies_are_pinned_and_used_by_setup_and_ci():
    """`make setup` (used by `make test` and .ci/run) installs with -c constraints.txt, which pins every
    distribution the project's dependencies and extras pull in."""
    import tomllib

    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not pinned with =="
            pins[_normal(name)] = version
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"]) + [d for extra in project["optional-dependencies"].values() for d in extra]
    bootstrap = {"pip", "setuptools", "wheel"}  # come with the venv; `pip freeze` (make lock) leaves them out
    missing = sorted(install_closure(declared) - set(pins) - bootstrap)
    assert not missing, f"installed by `make setup` but not pinned in constraints.txt: {missing} (run `make lock`)"
    makefile = (REPO_ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if re.search(r"\bpip install\b", line)]
    assert installs, "make setup installs nothing with pip or uv"
    for line in installs:  # uv, the packages, and pip's fallback all take the same pins
        assert "-c constraints.txt" in line, f"an install in the Makefile ignores constraints.txt: {line.strip()!r}"
    assert re.search(r"^test: setup", makefile, re.MULTILINE)
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()

"""The deployment files and config parsing: every file is read with the official protos (or their exact
mirrors) and validated; `carclf serving-config`; docker-compose and Kubernetes manifests; flags."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from carclf.errors import ConfigError
from carclf.serving import config as cfg
from carclf.serving import protos
from carclf.serving.commands import serving_config
from carclf.serving.options import ServerOptions, add_arguments
from tests.serving.conftest import REPO_ROOT

SERVING = REPO_ROOT / "serving"
DEPLOY = SERVING / "deploy"
BACKBONES = ["mobilenet_v2", "mobilenet_v2_192", "mobilenet_v2_288", "xception", "efficientnet_b3"]


def official_models_config(path: Path) -> model_server_config_pb2.ModelServerConfig:
    return text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())


# ------------------------------------------------------------------------------------- shipped files

def test_models_config_lists_every_backbone_with_policy_and_labels(tmp_path):
    proto = official_models_config(SERVING / "models.config")
    entries = proto.model_config_list.config
    assert [e.name for e in entries] == BACKBONES
    for entry in entries:
        assert entry.base_path == f"/models/{entry.name}" and entry.model_platform == "tensorflow"
        assert entry.model_version_policy.WhichOneof("policy_choice") == "latest"
        assert set(entry.version_labels) == {"stable", "canary"}
    # The embedded server reads /models/<name> from the local model repository.
    parsed = cfg.load_models_config(SERVING / "models.config", cfg.BasePathResolver(tmp_path))
    if not Path("/models").exists():
        assert [m.base_path for m in parsed.models] == [(tmp_path / name).resolve() for name in BACKBONES]
    assert parsed.models[0].policy == cfg.VersionPolicy("latest", num_versions=2)


def test_batching_config_follows_cpu_guidance():
    proto = text_format.Parse((SERVING / "batching.config").read_text(), protos.BatchingParameters())
    assert proto.max_batch_size.value >= 8 and proto.num_batch_threads.value >= 1
    parsed = cfg.load_batching_config(SERVING / "batching.config")
    assert parsed.batch_timeout_micros <= 10_000 and parsed.max_enqueued_batches >= parsed.num_batch_threads


def test_monitoring_config():
    proto = text_format.Parse((SERVING / "monitoring.config").read_text(), protos.MonitoringConfig())
    assert proto.prometheus_config.enable and proto.prometheus_config.path == cfg.DEFAULT_PROMETHEUS_PATH


def test_mirrored_messages_match_the_official_schema():
    batching = protos.BatchingParameters().DESCRIPTOR
    assert batching.full_name == "tensorflow.serving.BatchingParameters"
    assert {f.name: f.number for f in batching.fields} == {
        "max_batch_size": 1, "batch_timeout_micros": 2, "max_enqueued_batches": 3, "num_batch_threads": 4,
        "thread_pool_name": 5, "allowed_batch_sizes": 6, "pad_variable_length_inputs": 7}
    assert protos.MonitoringConfig().DESCRIPTOR.full_name == "tensorflow.serving.MonitoringConfig"


def _server_flags(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(args)


def test_docker_compose_runs_the_official_image_on_these_files():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    service = compose["services"]["tfserving"]
    assert service["image"].split(":")[0] == "tensorflow/serving"
    assert service["entrypoint"] == ["tensorflow_model_server"]
    flags = _server_flags(service["command"])  # the embedded server takes the same flags
    assert flags.model_config_file == "/config/models.config" and flags.enable_batching
    assert {"8500:8500", "8501:8501"} <= set(service["ports"])
    mounts = dict(volume.split(":")[:2] for volume in service["volumes"])
    assert mounts.pop("../../model_repository") == "/models"  # written by `carclf export`
    for source in mounts:
        assert (DEPLOY / source).is_file(), f"docker-compose mounts {source}, which does not exist"


def test_kubernetes_manifests():
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    service = yaml.safe_load((DEPLOY / "k8s" / "service.yaml").read_text())
    pvc = yaml.safe_load((DEPLOY / "k8s" / "pvc.yaml").read_text())
    assert deployment["kind"] == "Deployment" and deployment["spec"]["replicas"] >= 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("tensorflow/serving:")
    flags = _server_flags(container["args"])
    # connections are recycled, so that clients spread over replicas a scale-up adds
    ages = dict(ServerOptions(grpc_channel_arguments=flags.grpc_channel_arguments).channel_arguments())
    assert ages["grpc.max_connection_age_ms"] > 0 and ages["grpc.max_connection_age_grace_ms"] > 0
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["bash", "/config/readiness.sh"]
    mounted = {item["path"] for item in deployment["spec"]["template"]["spec"]["volumes"][0]["configMap"]["items"]}
    assert mounted == {"models.config", "batching.config", "monitoring.config", "readiness.sh"}
    assert service["kind"] == "Service"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["port"] for p in service["spec"]["ports"]} == {8500, 8501}
    claim = deployment["spec"]["template"]["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"]
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == claim
    # the replicas read the repository; a publishing pod must be able to write new versions into it meanwhile
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["readOnly"] is True and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_readiness_script_checks_model_state(target, embedded_only, conformance_repository, tmp_path):
    """The k8s/compose readiness probe, run against the embedded server (same REST status answer)."""
    port = target.rest.rsplit(":", 1)[1]
    script = DEPLOY / "readiness.sh"
    ok = subprocess.run(["bash", str(script), str(conformance_repository / "models.config"), port],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    missing = tmp_path / "models.config"
    missing.write_text('model_config_list { config { name: "not_loaded" base_path: "/models/x" } }')
    failed = subprocess.run(["bash", str(script), str(missing), port], capture_output=True, text=True, timeout=30)
    assert failed.returncode != 0 and "not_loaded" in failed.stderr
    # a commented-out entry is not served, and a name may be single-quoted (both valid text proto)
    served = (conformance_repository / "models.config").read_text()
    edited = tmp_path / "edited.config"
    edited.write_text("# config { name: \"old_model\" base_path: \"/models/old\" }\n"
                      + re.sub(r'name: "([^"]+)"', r"name: '\1'", served, count=1))
    quoted = subprocess.run(["bash", str(script), str(edited), port], capture_output=True, text=True, timeout=30)
    assert quoted.returncode == 0, quoted.stderr
    assert "'" in edited.read_text() and "old_model" in edited.read_text()


# ------------------------------------------------------------------------------------- parsing and validation

def _models(text: str, root: Path) -> cfg.ModelsConfig:
    return cfg.parse_models_config(text, cfg.BasePathResolver(root), source="test.config")


@pytest.mark.parametrize("text,field,needle", [
    ('model_config_list { config { name: "a/b" base_path: "{root}/a" } }', "name", "a/b"),
    ('model_config_list { config { name: "" base_path: "{root}/a" } }', "name", "model name"),
    ('model_config_list { config { name: "a" base_path: "relative/a" } }', "base_path", "absolute"),
    ('model_config_list { config { name: "a" base_path: "{root}/../x" } }', "base_path", ".."),
    ('model_config_list { config { name: "a" base_path: "/etc" } }', "base_path", "outside the model repository"),
    ('model_config_list { config { name: "a" base_path: "gs://bucket/a" } }', "base_path", "local folders"),
    ('model_config_list { config { name: "a" base_path: "{root}/a" model_platform: "onnx" } }', "model_platform",
     "onnx"),
    ('model_config_list { config { name: "a" base_path: "{root}/a" } config { name: "a" base_path: "{root}/b" } }',
     "name", "twice"),
    ('model_config_list { config { name: "a" base_path: "{root}/a" version_labels { key: "bad-label" value: 1 } } }',
     "version_labels", "bad-label"),
    ('model_config_list { config { name: "a" base_path: "{root}/a" model_version_policy { specific {} } } }',
     "model_version_policy", "empty"),
    ('model_config_list { config { nme: "a" } }', None, "ModelServerConfig"),
    ('model_config_list { config { name: "a" base_path: "{root}/a" version_labels { key: "stable" value: -1 } } }',
     "version_labels", "-1"),
])
def test_bad_models_config_names_file_field_and_value(tmp_path, text, field, needle):
    with pytest.raises(ConfigError) as info:
        _models(text.replace("{root}", str(tmp_path)), tmp_path)
    message = info.value.message
    assert message.startswith("test.config: ") and needle in message
    if field:
        assert field in message


def test_symlink_escaping_the_repository_is_refused(tmp_path):
    root, outside = tmp_path / "repo", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "sneaky").symlink_to(outside)
    with pytest.raises(ConfigError, match="outside the model repository"):
        _models(f'model_config_list {{ config {{ name: "a" base_path: "{root}/sneaky" }} }}', root)


def test_version_policies(tmp_path):
    parsed = _models(f'''model_config_list {{
      config {{ name: "a" base_path: "{tmp_path}/a" }}
      config {{ name: "b" base_path: "{tmp_path}/b" model_version_policy {{ all {{}} }} }}
      config {{ name: "c" base_path: "{tmp_path}/c" model_version_policy {{ specific {{ versions: [3, 1] }} }} }}
      config {{ name: "d" base_path: "{tmp_path}/d" model_version_policy {{ latest {{ num_versions: 2 }} }} }}
    }}''', tmp_path)
    on_disk = [1, 2, 3, 5]
    assert [m.policy.select(on_disk) for m in parsed.models] == [{5}, {1, 2, 3, 5}, {1, 3}, {3, 5}]
    zero = _models(f'model_config_list {{ config {{ name: "z" base_path: "{tmp_path}/z" model_version_policy '
                   '{ specific { versions: [0, 2] } } } }', tmp_path)
    assert zero.models[0].policy.select([0, 1, 2]) == {0, 2}  # version 0 is a version (a folder named 0)


@pytest.mark.parametrize("text,needle", [
    ("max_batch_size { value: 0 }", "max_batch_size"),
    ("max_batch_size { value: 8 } allowed_batch_sizes: [2, 4]", "allowed_batch_sizes"),
    ("max_batch_size { value: 8 } allowed_batch_sizes: [4, 2, 8]", "increasing"),
    ("max_batch_size { value: 8 } allowed_batch_sizes: [2, 2, 8]", r"strictly increasing, received \[2, 2, 8\]"),
    ("batch_timeout_micros { value: -1 }", "batch_timeout_micros"),
    ("pad_variable_length_inputs: true", "pad_variable_length_inputs"),
    ("num_batch_threads { value: 1000000 }", r"field 'num_batch_threads': must be <= 1024, received 1000000"),
    ("max_batch_sze { value: 8 }", "BatchingParameters"),
])
def test_bad_batching_config(text, needle):
    with pytest.raises(ConfigError, match=needle):
        cfg.parse_batching_config(text, source="batching.config")


def test_bad_monitoring_path():
    with pytest.raises(ConfigError, match="prometheus_config.path"):
        cfg.parse_monitoring_config('prometheus_config { enable: true path: "/v1/models/x" }')


# ------------------------------------------------------------------------------------- serving-config, flags

def test_serving_config_writes_a_loadable_config(conformance_repository, tmp_path):
    out = tmp_path / "models.config"
    args = argparse.Namespace(repository=str(conformance_repository), output=str(out), base_path_prefix="",
                              models=None, policy="labelled")
    assert serving_config.run(args) == 0
    proto = official_models_config(out)
    entries = {e.name: e for e in proto.model_config_list.config}
    assert set(entries) == {"tiny_a", "tiny_b", "echo"}
    assert list(entries["tiny_a"].model_version_policy.specific.versions) == [1, 2]
    assert dict(entries["tiny_a"].version_labels) == {"stable": 1, "canary": 2}
    assert dict(entries["tiny_b"].version_labels) == {"stable": 1, "canary": 1}
    parsed = cfg.load_models_config(out, cfg.BasePathResolver(conformance_repository))
    assert {m.name: m.base_path for m in parsed.models}["tiny_b"] == (conformance_repository / "tiny_b").resolve()

    args.base_path_prefix, args.output = "/models", str(tmp_path / "container.config")
    serving_config.run(args)
    assert {e.base_path for e in official_models_config(tmp_path / "container.config").model_config_list.config} == {
        "/models/tiny_a", "/models/tiny_b", "/models/echo"}


def test_serving_config_leaves_out_version_folders_without_a_savedmodel(conformance_repository, tmp_path, capsys):
    """An empty or half-copied version folder (no saved_model.pb) would take the stable or canary label and
    fail to load in TF Serving; it is left out, with a note, and a model with no complete version with it."""
    repo = tmp_path / "repository"
    shutil.copytree(conformance_repository, repo)
    (repo / "tiny_a" / "3" / "variables").mkdir(parents=True)  # newer than the complete versions 1 and 2
    (repo / "junk" / "1").mkdir(parents=True)
    out = tmp_path / "models.config"
    args = argparse.Namespace(repository=str(repo), output=str(out), base_path_prefix="", models=None,
                              policy="labelled")
    assert serving_config.run(args) == 0
    entries = {e.name: e for e in official_models_config(out).model_config_list.config}
    assert set(entries) == {"tiny_a", "tiny_b", "echo"}
    assert dict(entries["tiny_a"].version_labels) == {"stable": 1, "canary": 2}
    err = capsys.readouterr().err
    assert "tiny_a: leaving out version folder(s) [3] without saved_model.pb or saved_model.pbtxt" in err
    assert "junk: leaving out version folder(s) [1]" in err


def test_serving_config_rewrites_its_output_in_place(conformance_repository, tmp_path):
    """A container that mounts the one file (docker-compose) sees the new text only if the inode stays: a hard
    link stands in for the mount."""
    out, mounted = tmp_path / "models.config", tmp_path / "mounted.config"
    args = argparse.Namespace(repository=str(conformance_repository), output=str(out), base_path_prefix="",
                              models=["tiny_b"], policy="labelled")
    serving_config.run(args)
    mounted.hardlink_to(out)
    args.models = None
    serving_config.run(args)
    assert out.stat().st_ino == mounted.stat().st_ino
    assert {e.name for e in official_models_config(mounted).model_config_list.config} == {"tiny_a", "tiny_b", "echo"}


def test_serving_config_cli_refuses_an_empty_repository(tmp_path):
    result = subprocess.run([sys.executable, "-m", "carclf", "serving-config", "--repository", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 2 and "no model with integer version folders" in result.stderr


def test_serving_config_given_one_models_folder_names_the_repository_above_it(conformance_repository):
    """``--repository model_repository/tiny_a`` (a model, its folders versions): refused, naming the folder to give."""
    with pytest.raises(ConfigError) as refused:
        serving_config.build_entries(conformance_repository / "tiny_a")
    versions = sorted(int(p.name) for p in (conformance_repository / "tiny_a").iterdir() if p.name.isdigit())
    assert (f"is itself a model: its folders {versions} are versions; give the repository that holds it, here "
            f"{conformance_repository.absolute()})") in str(refused.value)


def test_serving_config_cli_refuses_a_folder_as_output_in_one_line(conformance_repository, tmp_path):
    result = subprocess.run([sys.executable, "-m", "carclf", "serving-config", "--repository",
                             str(conformance_repository), "--output", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == (f"carclf serving-config: error: --output {str(tmp_path)!r} is a folder; give a "
                                     "file path")


@pytest.mark.parametrize("args,needle", [
    (["--model_name", "a"], "--model_name 'a' needs --model_base_path, the folder of its versions"),
    ([], "nothing to serve"),
    (["--model_name", "a", "--model_base_path", "/m/a", "--port", "70000"], "--port"),
    (["--model_name", "a", "--model_base_path", "/m/a", "--batching_parameters_file", "b"], "--enable_batching"),
    (["--model_name", "a", "--model_base_path", "/m/a", "--batching_early_dispatch"], "--batching_early_dispatch"),
    (["--model_config_file", "{tmp}"], "is a folder, not a file"),
    (["--ensemble_config_file", "x", "--ensemble_config_file", "{tmp}/../{tmpname}/x"], "the same file is given twice"),
])
def test_flag_validation(args, needle, tmp_path):
    if "x" in args:
        config = tmp_path / "x"
        config.write_text("")
        args = [str(config) if a == "x" else a for a in args]
    args = [a.replace("{tmp}", str(tmp_path)).replace("{tmpname}", tmp_path.name) for a in args]
    with pytest.raises(ConfigError, match=needle):
        ServerOptions.from_args(_server_flags(args))


def test_model_flags_default_and_yield_to_a_config_file_as_in_tf_serving(tmp_path, caplog):
    """--model_base_path alone serves the model as "default"; with --model_config_file (the official image's
    entrypoint always passes --model_name and --model_base_path) the file says what is served, with a warning."""
    alone = ServerOptions.from_args(_server_flags(["--model_base_path", "/m/a"]))
    assert (alone.model_name, alone.model_base_path) == ("default", "/m/a")
    config = tmp_path / "models.config"
    config.write_text("model_config_list {}")
    both = ServerOptions.from_args(_server_flags(["--model_config_file", str(config), "--model_name", "a",
                                                  "--model_base_path", "/m/a"]))
    assert (both.model_config_file, both.model_name, both.model_base_path) == (str(config), "", "")
    assert any("--model_name/--model_base_path are ignored" in r.getMessage() for r in caplog.records)


def test_abbreviated_flags_are_refused(capsys):
    """argparse takes a prefix of a flag for the flag; tensorflow_model_server does not."""
    from carclf import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--model_base_path", "/m/a", "--batching_param=b.config"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --batching_param=b.config" in capsys.readouterr().err


def test_tf_serving_boolean_flag_forms():
    flags = _server_flags(["--model_name", "a", "--model_base_path", "/m/a", "--enable_batching",
                           "--enable_model_warmup=false", "--allow_version_labels_for_unavailable_models=true"])
    assert flags.enable_batching is True and flags.enable_model_warmup is False
    assert flags.allow_version_labels_for_unavailable_models is True and flags.host == "127.0.0.1"
    assert flags.batching_early_dispatch is False  # TF Serving's batching rule unless asked


@pytest.mark.parametrize("name", ["models.config", "batching.config", "monitoring.config", "ensemble"])
def test_a_config_file_with_a_byte_order_mark_is_refused_saying_so(tmp_path, name):
    """A shipped config file re-saved by an editor that adds a UTF-8 byte order mark: TF Serving's and Triton's
    parsers refuse it, so the embedded server does too, naming the file and the mark (protobuf's own message
    points at an invisible character). The same file without the mark loads."""
    from carclf.ensemble.config import load_config, render

    loaders = {"models.config": lambda path: cfg.load_models_config(path, cfg.BasePathResolver(tmp_path)),
               "batching.config": cfg.load_batching_config, "monitoring.config": cfg.load_monitoring_config,
               "ensemble": load_config}
    plain = tmp_path / "plain" / name
    plain.parent.mkdir()
    if name == "ensemble":
        plain.write_text(render("e", ["a"]))
    else:
        plain.write_bytes((SERVING / name).read_bytes())
    loaders[name](plain)
    marked = tmp_path / name
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    with pytest.raises(ConfigError) as info:
        loaders[name](marked)
    assert str(info.value).startswith(f"{marked}: starts with a UTF-8 byte order mark"), str(info.value)

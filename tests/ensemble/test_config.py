"""The ensemble config: Triton's ModelConfig schema, the DAG rules, the parameters, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from carclf.ensemble.config import AGGREGATE_OUTPUTS, load_config, parse_config, render
from carclf.errors import ConfigError
from carclf.tta import POLICIES

SHIPPED = Path(__file__).resolve().parents[2] / "ensemble" / "car_ensemble" / "config.pbtxt"


def test_shipped_config_parses_with_tritons_schema():
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    proto = text_format.Parse(SHIPPED.read_text(), model_config_pb2.ModelConfig())
    assert proto.platform == "ensemble"
    config = load_config(SHIPPED)
    assert config.name == "car_ensemble" and config.version == 1
    assert config.member_names == ("mobilenet_v2", "mobilenet_v2_192", "mobilenet_v2_288")
    assert all(m.version is None for m in config.members)  # model_version -1: the latest
    assert config.tta.name in POLICIES
    assert config.aggregation in ("mean", "weighted_mean", "geometric_mean")
    assert set(config.outputs) == set(AGGREGATE_OUTPUTS)
    assert 1 <= config.quorum <= len(config.members)


def test_render_round_trips_every_parameter(tmp_path):
    text = render("e", {"tiny_a": 2, "tiny_b": -1}, parameters={
        "tta_policy": "hflip_crops", "aggregation": "geometric_mean", "weight.tiny_a": "0.25",
        "version_label.tiny_b": "canary", "input_size.tiny_b": "48", "resize.tiny_b": "letterbox", "top_k": "3", "deadline_ms": "1500",
        "failure_policy": "degrade", "quorum": "1", "degrade_on": "unavailable, deadline_exceeded",
        "retry_max_attempts": "4", "retry_initial_backoff_ms": "5", "retry_max_backoff_ms": "50",
        "retry_backoff_multiplier": "3"})
    c = parse_config(text)
    a, b = c.members
    assert (a.name, a.version, a.weight, a.version_label) == ("tiny_a", 2, 0.25, None)
    assert (b.name, b.version, b.version_label, b.input_size, b.resize) == ("tiny_b", None, "canary", 48, "letterbox")
    assert a.resize is None  # read from the member's model card
    assert c.tta == POLICIES["hflip_crops"] and c.aggregation == "geometric_mean"
    assert (c.top_k, c.deadline_s, c.failure_policy, c.quorum) == (3, 1.5, "degrade", 1)
    assert c.degrade_on == ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert (c.retry.max_attempts, c.retry.initial_backoff_s, c.retry.max_backoff_s, c.retry.multiplier) == \
        (4, 0.005, 0.05, 3.0)
    assert [c.retry.backoff(i) for i in (1, 2, 3, 4)] == pytest.approx([0.005, 0.015, 0.045, 0.05])


@pytest.mark.parametrize("multiplier", ["1e200", "1e300"])
def test_a_huge_backoff_multiplier_reaches_the_cap_instead_of_overflowing(multiplier):
    """``multiplier ** (attempt - 1)`` overflowed (OverflowError) after a member's failed attempt, so one
    UNAVAILABLE member failed the whole request instead of being retried or left out."""
    c = parse_config(render("e", ["a"], parameters={"retry_backoff_multiplier": multiplier,
                                                     "retry_max_attempts": "10", "retry_initial_backoff_ms": "5",
                                                     "retry_max_backoff_ms": "50"}))
    assert [c.retry.backoff(i) for i in range(1, 11)] == pytest.approx([0.005] + [0.05] * 9)


def test_declared_tta_policy_as_json():
    policy = '{"name": "two_crops", "views": [{"name": "full"}, {"name": "top", "box": [0, 0, 0.5, 1]}]}'
    c = parse_config(render("e", ["m"], parameters={"tta_policy": policy}))
    assert c.tta.name == "two_crops" and len(c.tta) == 2 and c.tta.views[1].box == (0.0, 0.0, 0.5, 1.0)


def _edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


BASE = render("tiny_ensemble", ["tiny_a", "tiny_b"])

# (what is wrong, config text, field named in the error, value named in the error)
BAD = [
    ("platform", _edit(BASE, 'platform: "ensemble"', 'platform: "tensorflow_savedmodel"'), "platform",
     "tensorflow_savedmodel"),
    ("aggregation", render("e", ["a", "b"], parameters={"aggregation": "median"}), "parameters['aggregation']",
     "median"),
    ("weight", render("e", ["a", "b"], parameters={"weight.a": "-1"}), "parameters['weight.a']", "-1"),
    ("weight not a number", render("e", ["a", "b"], parameters={"weight.a": "heavy"}), "parameters['weight.a']",
     "heavy"),
    ("weight of a stranger", render("e", ["a", "b"], parameters={"weight.c": "1"}), "parameters['weight.c']", "'c'"),
    ("unknown parameter", render("e", ["a"], parameters={"agregation": "mean"}), "parameters['agregation']",
     "agregation"),
    ("label and version", render("e", {"a": 3}, parameters={"version_label.a": "canary"}),
     "parameters['version_label.a']", "3"),
    ("bad label", render("e", ["a"], parameters={"version_label.a": "can ary"}), "parameters['version_label.a']",
     "can ary"),
    ("quorum", render("e", ["a", "b"], parameters={"failure_policy": "degrade", "quorum": "3"}),
     "parameters['quorum']", "3"),
    ("version 0", _edit(BASE, "versions: 1", "versions: 0"), "version_policy.specific.versions",
     "must be >= 1, received 0"),
    ("degrade_on under fail", render("e", ["a", "b"], parameters={"degrade_on": "UNAVAILABLE"}),
     "parameters['degrade_on']", "'UNAVAILABLE' with failure_policy 'fail'"),
    ("policy", render("e", ["a"], parameters={"failure_policy": "retry_forever"}), "parameters['failure_policy']",
     "retry_forever"),
    ("resize", render("e", ["a"], parameters={"resize.a": "stretch"}), "parameters['resize.a']", "stretch"),
    ("tta", render("e", ["a"], parameters={"tta_policy": "ten_crops"}), "parameters['tta_policy']", "ten_crops"),
    ("tta json", render("e", ["a"], parameters={"tta_policy": '{"name": "x", "views": [{"name": "v", '
                                                              '"box": [0.5, 0, 0.2, 1]}]}'}),
     "parameters['tta_policy']", "0.5"),
    ("deadline", render("e", ["a"], parameters={"deadline_ms": "0"}), "parameters['deadline_ms']", "0"),
    ("backoff above its maximum", render("e", ["a"], parameters={"retry_initial_backoff_ms": "500",
                                                                 "retry_max_backoff_ms": "10"}),
     "parameters['retry_initial_backoff_ms']", "500"),
    ("model_version 0", _edit(BASE, 'model_name: "tiny_a"\n    model_version: -1', 'model_name: "tiny_a"\n    '
                              'model_version: 0'), "ensemble_scheduling.step[1].model_version", "0"),
    ("member input name", _edit(BASE, 'key: "pixels"', 'key: "image"'), "ensemble_scheduling.step[1].input_map",
     "image"),
    ("dangling tensor", _edit(BASE, 'value: "tiny_b_probabilities"\n    }\n    output_map',
                              'value: "tiny_c_probabilities"\n    }\n    output_map'),
     "ensemble_scheduling.step[3].input_map", "tiny_c_probabilities"),
    ("output type", _edit(BASE, 'name: "probabilities"\n  data_type: TYPE_FP32',
                          'name: "probabilities"\n  data_type: TYPE_FP16'), "output[0].data_type", "TYPE_FP16"),
    ("input type", _edit(BASE, "data_type: TYPE_STRING\n  dims: 1\n  reshape",
                         "data_type: TYPE_UINT8\n  dims: 1\n  reshape"), "input[0].data_type", "TYPE_UINT8"),
    ("max_batch_size", _edit(BASE, "max_batch_size: 64", "max_batch_size: 0"), "max_batch_size", "0"),
    ("name with a path", _edit(BASE, 'name: "tiny_ensemble"', 'name: "car ensemble/x"'), "name", "car ensemble/x"),
    ("no tta step", _edit(BASE, 'model_name: "carclf_tta"', 'model_name: "carclf_views"'),
     "ensemble_scheduling.step", "carclf_tta"),
    # Triton settings this ensemble does not read are refused, not silently ignored
    ("instance_group", BASE + "instance_group [{ count: 4 kind: KIND_GPU }]\n", "instance_group", "remove it"),
    ("response_cache", BASE + "response_cache { enable: true }\n", "response_cache", "remove it"),
    ("backend", BASE + 'backend: "python"\n', "backend", "remove it"),
    ("a step's model_namespace", _edit(BASE, 'model_name: "tiny_a"', 'model_name: "tiny_a"\n    model_namespace: "x"'),
     "ensemble_scheduling.step[1].model_namespace", "remove it"),
    # the product's clients send photos as image_bytes, to backbones and ensemble alike
    ("input renamed", _edit(BASE, 'name: "image_bytes"', 'name: "photo"'), "input[0].name", "'photo'"),
    ("input_size half given", render("e", ["a", "b"], parameters={"input_size.a": "64x"}),
     "parameters['input_size.a']", "expected pixels: one side, or HEIGHTxWIDTH (integers), received '64x'"),
    ("input_size too small", render("e", ["a", "b"], parameters={"input_size.a": "64x4"}),
     "parameters['input_size.a']", "each side must be 8 to 4096 pixels, received '64x4'"),
    # protobuf's text parser keeps the last of two equal map keys: a key given twice is refused
    ("parameter twice", render("e", ["a", "b"], parameters={"top_k": "3"}) + 'parameters { key: "top_k" value { '
     'string_value: "1" } }\n', "parameters['top_k']", "key 'top_k' is given 2 times"),
    ("input_map key twice", _edit(BASE, 'key: "pixels"', 'key: "pixels"\n      value: "views"\n    }\n    input_map {\n'
                                  '      key: "pixels"'), "ensemble_scheduling.step[1].input_map['pixels']",
     "key 'pixels' is given 2 times"),
    # a fixed dimension must be what the ensemble answers (members known from the file)
    ("member dims", _edit(BASE, 'name: "member_names"\n  data_type: TYPE_STRING\n  dims: -1',
                          'name: "member_names"\n  data_type: TYPE_STRING\n  dims: 3'), "output[5].dims",
     "output 'member_names' declares 3 members, but the ensemble has 2; declare -1 (variable) or 2"),
    # aggregation 'mean' ignores weights: a file giving both is a slip
    ("weights with mean", render("e", ["a", "b"], parameters={"aggregation": "mean", "weight.a": "5"}),
     "parameters['weight.a']", "aggregation 'mean' takes no weights, received '5'"),
    # numbers outside what the README's parameter table allows
    ("infinite weight", render("e", ["a", "b"], parameters={"aggregation": "weighted_mean", "weight.a": "inf"}),
     "parameters['weight.a']", "expected a finite number, received 'inf'"),
    ("top_k 0", render("e", ["a"], parameters={"top_k": "0"}), "parameters['top_k']", "must be >= 1, received '0'"),
    ("quorum 0", render("e", ["a", "b"], parameters={"failure_policy": "degrade", "quorum": "0"}),
     "parameters['quorum']", "must be >= 1, received '0'"),
    ("deadline above 10 minutes", render("e", ["a"], parameters={"deadline_ms": "600001"}),
     "parameters['deadline_ms']", "must be <= 600000, received '600001'"),
    ("11 attempts", render("e", ["a"], parameters={"retry_max_attempts": "11"}), "parameters['retry_max_attempts']",
     "must be <= 10, received '11'"),
    ("shrinking backoff", render("e", ["a"], parameters={"retry_backoff_multiplier": "0.5"}),
     "parameters['retry_backoff_multiplier']", "must be >= 1.0, received '0.5'"),
    ("input_size too large", render("e", ["a", "b"], parameters={"input_size.a": "4097"}),
     "parameters['input_size.a']", "each side must be 8 to 4096 pixels, received '4097'"),
    ("no status codes to degrade on", render("e", ["a", "b"], parameters={"failure_policy": "degrade",
                                                                        "degrade_on": ","}),
     "parameters['degrade_on']", "received ','"),
    ("model_version -2", _edit(BASE, 'model_name: "tiny_a"\n    model_version: -1', 'model_name: "tiny_a"\n    '
                               'model_version: -2'), "ensemble_scheduling.step[1].model_version", "received -2"),
    ("a tensor written twice", _edit(BASE, 'value: "tiny_b_probabilities"\n    }\n  }\n  step',
                                     'value: "tiny_a_probabilities"\n    }\n  }\n  step'),
     "ensemble_scheduling.step[2].output_map", "tensor 'tiny_a_probabilities' is already produced by step 1 (tiny_a)"),
]


@pytest.mark.parametrize("what,text,field,value", BAD, ids=[b[0] for b in BAD])
def test_errors_name_file_field_and_value(tmp_path, what, text, field, value):
    path = tmp_path / "config.pbtxt"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.source == str(path) and err.field == field
    assert str(path) in str(err) and field in str(err) and value in str(err), str(err)
    assert err.code == "INVALID_ARGUMENT"


def test_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "config.pbtxt"
    path.write_text(BASE.replace("max_batch_size: 64", "max_batch_size: 64\nmax_batch_sise: 3"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "max_batch_sise" in str(info.value)


def test_missing_file_and_label_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.pbtxt")
    path = tmp_path / "config.pbtxt"
    path.write_text(_edit(BASE, 'name: "probabilities"\n  data_type: TYPE_FP32\n  dims: -1',
                          'name: "probabilities"\n  data_type: TYPE_FP32\n  dims: -1\n  label_filename: "labels.txt"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "output.label_filename" and "labels.txt" in str(info.value)
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    assert load_config(path).labels == ("a", "b", "c")
    (tmp_path / "labels.txt").write_bytes(b"\xef\xbb\xbfa\r\nb\r\nc\r\n")  # as Notepad may save it
    assert load_config(path).labels == ("a", "b", "c")


def test_overrides_are_validated(tiny_config):
    config = tiny_config()
    assert config.with_overrides(tta="hflip").tta == POLICIES["hflip"]
    assert config.with_overrides(weights={"tiny_a": 3.0}).weights == (3.0, 1.0)
    with pytest.raises(ConfigError, match="weights"):
        config.with_overrides(weights={"tiny_z": 1.0})
    with pytest.raises(ConfigError, match="median"):
        config.with_overrides(aggregation="median")


def test_a_tta_policy_typo_names_the_parameter_once(tmp_path):
    path = tmp_path / "config.pbtxt"
    path.write_text(render("e", ["a", "b"], parameters={"tta_policy": "hflipp"}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: field 'parameters['tta_policy']': unknown TTA policy 'hflipp'")
    assert str(info.value).count("field ") == 1


def test_defaults_are_the_documented_ones():
    """A config that sets no parameter behaves as ensemble/README.md's parameter table says."""
    c = parse_config(render("e", ["a", "b"]))
    assert c.tta == POLICIES["none"] and c.aggregation == "mean" and c.weights == (1.0, 1.0)
    assert (c.top_k, c.deadline_s, c.failure_policy, c.quorum) == (5, 5.0, "fail", 1)
    assert c.degrade_on == ("UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND", "RESOURCE_EXHAUSTED")
    assert (c.retry.max_attempts, c.retry.initial_backoff_s, c.retry.max_backoff_s, c.retry.multiplier) == \
        (3, 0.02, 0.2, 2.0)
    assert all(m.version is None and m.version_label is None and m.input_size is None and m.resize is None
               for m in c.members)


def test_values_at_the_documented_limits_are_accepted():
    """The edges of what the README allows load: weight 1 with 'mean', equal initial and maximum backoff,
    8 and 4096 pixel sides, and a quorum of every member under 'fail' (which needs them all anyway)."""
    c = parse_config(render("e", ["a", "b"], parameters={"aggregation": "mean", "weight.a": "1"}))
    assert c.weights == (1.0, 1.0)
    c = parse_config(render("e", ["a"], parameters={"retry_initial_backoff_ms": "50", "retry_max_backoff_ms": "50"}))
    assert c.retry.initial_backoff_s == c.retry.max_backoff_s == 0.05
    c = parse_config(render("e", ["a"], parameters={"input_size.a": "8x4096"}))
    assert c.members[0].input_size == (8, 4096)
    c = parse_config(render("e", ["a", "b"], parameters={"failure_policy": "fail", "quorum": "2"}))
    assert c.members_needed == 2


def test_a_label_file_needs_two_labels(tmp_path):
    path = tmp_path / "config.pbtxt"
    path.write_text(_edit(BASE, 'name: "probabilities"\n  data_type: TYPE_FP32\n  dims: -1',
                          'name: "probabilities"\n  data_type: TYPE_FP32\n  dims: -1\n  label_filename: "labels.txt"'))
    (tmp_path / "labels.txt").write_text("only\n\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "output.label_filename" and "holds 1 labels, expected at least 2" in str(info.value)


def test_fixed_top_k_dims_may_be_the_number_of_classes_when_top_k_is_larger(tmp_path):
    """top_k 5 over 3 classes answers 3 top-k columns, so an output declaring 3 is right (and 5 is refused)."""
    text = _edit(BASE, 'name: "probabilities"\n  data_type: TYPE_FP32\n  dims: -1',
                 'name: "probabilities"\n  data_type: TYPE_FP32\n  dims: -1\n  label_filename: "labels.txt"')
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    path = tmp_path / "config.pbtxt"
    path.write_text(_edit(text, 'name: "top_k_labels"\n  data_type: TYPE_STRING\n  dims: -1',
                          'name: "top_k_labels"\n  data_type: TYPE_STRING\n  dims: 3'))
    config = load_config(path)
    assert config.top_k == 5 and config.labels == ("a", "b", "c")
    path.write_text(_edit(text, 'name: "top_k_labels"\n  data_type: TYPE_STRING\n  dims: -1',
                          'name: "top_k_labels"\n  data_type: TYPE_STRING\n  dims: 5'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "output[3].dims" and "declares 5 top-k classes, but the ensemble has 3" in str(info.value)


def test_a_version_label_is_ascii_letters_digits_and_underscore(tmp_path):
    """The README and the error say [a-zA-Z0-9_]+, as TF Serving's labels (carclf.serving.config.LABEL_RE): a label
    no server can hold must be refused when the file is read, not found missing at every request."""
    path = tmp_path / "config.pbtxt"
    path.write_text(render("e", ["a"], parameters={"version_label.a": "canäry"}), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "parameters['version_label.a']" and "received 'canäry'" in str(info.value)


def test_an_input_size_of_non_ascii_digits_is_a_config_error(tmp_path):
    """'²' passes str.isdigit but is no integer: a ConfigError naming the field, not a ValueError traceback."""
    path = tmp_path / "config.pbtxt"
    path.write_text(render("e", ["a"], parameters={"input_size.a": "²"}), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "parameters['input_size.a']" and "received '²'" in str(info.value)

"""The ensemble as configuration: a Triton ``config.pbtxt`` parsed with Triton's own protobuf schema.

The file is a ``ModelConfig`` with ``platform: "ensemble"``. Its ``ensemble_scheduling`` is a DAG of steps:

* one ``carclf_tta`` step (built in): ensemble input ``image_bytes`` -> ``views`` (decode once, TTA views);
* one step per member backbone: ``pixels`` <- views, ``probabilities`` -> a per-member tensor;
  ``model_version`` is -1 for the latest version or a fixed version;
* one ``carclf_aggregate`` step (built in): member tensors (keyed by member name) -> the ensemble outputs.

Everything Triton's schema has no field for is declared in its ``parameters`` map (string values):
TTA policy, aggregation, member weights, version labels, input sizes, deadline, failure policy, quorum,
retries and top-k. Every problem raises ``ConfigError`` naming the file, the field and the value.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from carclf import contract, imaging
from carclf.errors import ConfigError
from carclf.serving.config import LABEL_RE, MODEL_NAME_RE, parse_text_proto
from carclf.tta import TTAPolicy, get_policy

PLATFORM = "ensemble"
TTA_STEP = "carclf_tta"
AGGREGATE_STEP = "carclf_aggregate"
BUILTIN_STEPS = (TTA_STEP, AGGREGATE_STEP)
VIEWS_KEY = "views"

AGGREGATIONS = ("mean", "weighted_mean", "geometric_mean")
FAILURE_POLICIES = ("fail", "degrade")
RETRYABLE_CODES = ("UNAVAILABLE",)
DEFAULT_DEGRADE_ON = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "NOT_FOUND", "RESOURCE_EXHAUSTED")

# What the aggregate step can produce: output name -> (Triton data type, dims without the batch dimension).
# -1 stands for the number of classes, the number of members or top-k, which the file may leave open.
AGGREGATE_OUTPUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    contract.OUTPUT_PROBABILITIES: ("TYPE_FP32", (-1,)),
    contract.OUTPUT_CLASS_ID: ("TYPE_INT64", ()),
    contract.OUTPUT_LABEL: ("TYPE_STRING", ()),
    "top_k_labels": ("TYPE_STRING", (-1,)),
    "top_k_probabilities": ("TYPE_FP32", (-1,)),
    "member_names": ("TYPE_STRING", (-1,)),
    "member_versions": ("TYPE_INT64", (-1,)),
    "member_probabilities": ("TYPE_FP32", (-1, -1)),
    "member_labels": ("TYPE_STRING", (-1,)),
    "member_answered": ("TYPE_BOOL", (-1,)),
    "member_latency_ms": ("TYPE_FP32", (-1,)),
    "degraded": ("TYPE_BOOL", ()),
}
# Triton data type -> numpy dtype name (as the Servable interface describes tensors).
NUMPY_DTYPES = {"TYPE_FP32": "float32", "TYPE_INT64": "int64", "TYPE_STRING": "object", "TYPE_BOOL": "bool"}

# The ModelConfig fields this ensemble reads, per message; any other field set is refused (Triton settings such
# as instance_group, response_cache, model_warmup or backend would silently do nothing here).
SUPPORTED_FIELDS = {
    "config": {"name", "platform", "max_batch_size", "version_policy", "input", "output", "ensemble_scheduling",
               "parameters"},
    "input": {"name", "data_type", "dims", "reshape"},
    "output": {"name", "data_type", "dims", "reshape", "label_filename"},
    "step": {"model_name", "model_version", "input_map", "output_map"},
}

# Global parameters and their parsers; per-member parameters are "<key>.<member name>".
_MEMBER_PARAMETERS = ("weight", "version_label", "input_size", "resize")
_GLOBAL_PARAMETERS = (
    "tta_policy", "aggregation", "top_k", "deadline_ms", "failure_policy", "quorum", "degrade_on",
    "retry_max_attempts", "retry_initial_backoff_ms", "retry_max_backoff_ms", "retry_backoff_multiplier",
)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of a member call that failed with a retryable code (UNAVAILABLE only), exponential backoff."""

    max_attempts: int = 3
    initial_backoff_s: float = 0.02
    max_backoff_s: float = 0.2
    multiplier: float = 2.0

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based). Grown step by step up to the cap, so a
        huge multiplier reaches the cap instead of overflowing a power."""
        delay = self.initial_backoff_s
        for _ in range(attempt - 1):
            if delay >= self.max_backoff_s:
                break
            delay *= self.multiplier
        return min(self.max_backoff_s, delay)


@dataclass(frozen=True)
class Member:
    """One backbone of the ensemble, called on its ``serving_pixels`` signature."""

    name: str
    version: int | None = None  # None: the latest (model_version -1)
    version_label: str | None = None
    weight: float = 1.0
    input_size: contract.Size | None = None  # one side or (height, width); None: from the member's model card
    resize: str | None = None  # None: read from the member's model card (carclf.imaging.RESIZE_MODES)
    tensor: str = ""  # the ensemble tensor its probabilities flow into


@dataclass(frozen=True)
class EnsembleConfig:
    name: str
    version: int
    members: tuple[Member, ...]
    tta: TTAPolicy
    aggregation: str = "mean"
    top_k: int = 5
    deadline_s: float = 5.0
    failure_policy: str = "fail"
    quorum: int = 1
    degrade_on: tuple[str, ...] = DEFAULT_DEGRADE_ON
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_batch_size: int = 64
    input_name: str = contract.INPUT_IMAGE_BYTES
    outputs: Mapping[str, str] = field(default_factory=dict)  # aggregate output -> ensemble output name
    # aggregate output -> (its index in the file's output list, its declared dims after the batch; -1 variable)
    output_dims: Mapping[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)
    labels: tuple[str, ...] | None = None  # from label_filename, else from the members' model cards
    source: str = "<memory>"

    @property
    def member_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    @property
    def members_needed(self) -> int:
        """Members that must answer: all of them under failure_policy 'fail', else the quorum."""
        return len(self.members) if self.failure_policy == "fail" else self.quorum

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(m.weight for m in self.members)

    def with_overrides(self, **changes) -> EnsembleConfig:
        """A copy with some settings changed (e.g. ``tta="none"``), validated like the file."""
        if "tta" in changes:
            changes["tta"] = get_policy(changes["tta"])
        if "weights" in changes:
            weights = dict(changes.pop("weights"))
            unknown = set(weights) - set(self.member_names)
            if unknown:
                raise ConfigError(f"weights for unknown members {sorted(unknown)}", source=self.source,
                                  field="weights")
            changes["members"] = tuple(replace(m, weight=float(weights.get(m.name, m.weight)))
                                       for m in self.members)
        config = replace(self, **changes)
        _check_semantics(config)
        return config


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_config(path: str | os.PathLike) -> EnsembleConfig:
    """Read and validate a Triton ensemble ``config.pbtxt``."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("ensemble configuration file does not exist", source=source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file: {exc}", source=source) from None
    return parse_config(text, source=source, base_dir=path.parent)


def parse_config(text: str, *, source: str = "<string>", base_dir: str | os.PathLike | None = None) -> EnsembleConfig:
    """Parse the text-protobuf ``ModelConfig`` with Triton's schema, then validate it."""
    from tritonclient.grpc import model_config_pb2

    proto = model_config_pb2.ModelConfig()
    parse_text_proto(text, proto, "Triton ModelConfig text protobuf", source)
    _check_repeated_map_keys(text, source)
    return from_proto(proto, source=source, base_dir=base_dir)


_ENTRY_LISTS = None  # ModelConfig with its maps read as lists of entries (built once)


def _model_config_with_entry_lists():
    """A copy of Triton's ``ModelConfig`` class whose map fields (``parameters``, ``input_map``, ...) parse as
    lists of key/value entries: protobuf's text parser keeps the last of two equal map keys without a word."""
    global _ENTRY_LISTS
    if _ENTRY_LISTS is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
        from tritonclient.grpc import model_config_pb2

        file_proto = descriptor_pb2.FileDescriptorProto()
        model_config_pb2.DESCRIPTOR.CopyToProto(file_proto)
        pending = list(file_proto.message_type)
        while pending:
            message = pending.pop()
            message.options.ClearField("map_entry")
            pending.extend(message.nested_type)
        file_proto.name = f"carclf_entry_lists/{file_proto.name}"  # its own pool: no clash with Triton's
        pool = descriptor_pool.DescriptorPool()
        pool.Add(file_proto)
        _ENTRY_LISTS = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{file_proto.package}.ModelConfig"))
    return _ENTRY_LISTS


def _check_repeated_map_keys(text: str, source: str) -> None:
    """ConfigError naming the field when a map key (a parameter, an input_map or output_map key) is given twice."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    listed = _model_config_with_entry_lists()()
    text_format.Parse(text, listed)

    def walk(message, original, where: str) -> None:
        for field_descriptor, value in message.ListFields():
            if field_descriptor.message_type is None:
                continue
            kind = original.fields_by_name[field_descriptor.name].message_type
            name = f"{where}{field_descriptor.name}"
            if kind.GetOptions().map_entry:
                keys = [entry.key for entry in value]
                twice = next((k for k in keys if keys.count(k) > 1), None)
                if twice is not None:
                    raise ConfigError(f"key {twice!r} is given {keys.count(twice)} times; give it once (the last "
                                      "would silently win)", source=source, field=f"{name}[{twice!r}]")
            elif field_descriptor.label == field_descriptor.LABEL_REPEATED:
                for i, item in enumerate(value):
                    walk(item, kind, f"{name}[{i}].")
            else:
                walk(value, kind, f"{name}.")

    walk(listed, model_config_pb2.ModelConfig.DESCRIPTOR, "")


def from_proto(proto, *, source: str = "<proto>", base_dir: str | os.PathLike | None = None) -> EnsembleConfig:
    """Validate a parsed ``ModelConfig`` and turn it into an ``EnsembleConfig``."""
    from tritonclient.grpc import model_config_pb2

    def fail(fld: str, message: str):
        raise ConfigError(message, source=source, field=fld)

    _check_supported_fields(proto, fail)
    if not proto.name:
        fail("name", "the ensemble needs a name, received an empty one")
    if not MODEL_NAME_RE.match(proto.name):
        fail("name", f"received {proto.name!r}; the ensemble is served as a model: 1-128 letters, digits, '_', '-' "
                     "or '.', starting with a letter or digit")
    if proto.platform != PLATFORM:
        fail("platform", f"expected {PLATFORM!r}, received {proto.platform!r}")
    if proto.max_batch_size <= 0:
        fail("max_batch_size", f"must be a positive number of photos per request, received {proto.max_batch_size}")
    version = _version(proto, fail)

    # Ensemble input: one string tensor of photo bytes per batch element.
    if len(proto.input) != 1:
        fail("input", f"expected exactly one input (the photo bytes), received {len(proto.input)}")
    inp = proto.input[0]
    if inp.name != contract.INPUT_IMAGE_BYTES:
        fail("input[0].name", f"expected {contract.INPUT_IMAGE_BYTES!r}, the name every client of the product "
                              f"sends photos as (as to each backbone), received {inp.name!r}")
    dtype = model_config_pb2.DataType.Name(inp.data_type)
    if dtype != "TYPE_STRING":
        fail("input[0].data_type", f"expected TYPE_STRING (encoded photos), received {dtype}")
    if _element_dims(inp) != ():
        fail("input[0].dims", f"each batch element is one photo: expected dims [1] with reshape {{ shape: [] }} "
                              f"or dims [], received {list(inp.dims)}")

    # Declared outputs must be ones the aggregate step can produce, with matching types.
    declared: dict[str, int] = {}
    labels_file = None
    for i, out in enumerate(proto.output):
        declared[out.name] = i
        if out.label_filename:
            if labels_file is not None:
                fail(f"output[{i}].label_filename", "only one output may name a label file")
            labels_file = out.label_filename
    if not declared:
        fail("output", "the ensemble declares no outputs")

    steps = list(proto.ensemble_scheduling.step)
    if not steps:
        fail("ensemble_scheduling.step", "the ensemble has no steps")
    tta_steps = [i for i, s in enumerate(steps) if s.model_name == TTA_STEP]
    agg_steps = [i for i, s in enumerate(steps) if s.model_name == AGGREGATE_STEP]
    for builtin, found in ((TTA_STEP, tta_steps), (AGGREGATE_STEP, agg_steps)):
        if len(found) != 1:
            fail("ensemble_scheduling.step", f"expected exactly one step with model_name {builtin!r}, "
                                             f"received {len(found)}")
    _check_dataflow(proto, steps, fail)

    tta_index = tta_steps[0]
    tta = steps[tta_index]
    _expect_keys(f"ensemble_scheduling.step[{tta_index}].input_map", tta.input_map, {inp.name}, fail)
    _expect_keys(f"ensemble_scheduling.step[{tta_index}].output_map", tta.output_map, {VIEWS_KEY}, fail)
    if tta.input_map[inp.name] != inp.name:
        fail(f"ensemble_scheduling.step[{tta_index}].input_map",
             f"{inp.name!r} must read the ensemble input {inp.name!r}, received {tta.input_map[inp.name]!r}")
    views_tensor = tta.output_map[VIEWS_KEY]

    members: list[Member] = []
    for i, step in enumerate(steps):
        if step.model_name in BUILTIN_STEPS:
            continue
        where = f"ensemble_scheduling.step[{i}]"
        if not MODEL_NAME_RE.match(step.model_name):
            fail(f"{where}.model_name", f"received {step.model_name!r}; a member is a served model name: 1-128 "
                                        "letters, digits, '_', '-' or '.', starting with a letter or digit")
        if any(m.name == step.model_name for m in members):
            fail(f"{where}.model_name", f"member {step.model_name!r} appears twice")
        _expect_keys(f"{where}.input_map", step.input_map, {contract.INPUT_PIXELS}, fail)
        _expect_keys(f"{where}.output_map", step.output_map, {contract.OUTPUT_PROBABILITIES}, fail)
        if step.input_map[contract.INPUT_PIXELS] != views_tensor:
            fail(f"{where}.input_map", f"members read the TTA views tensor {views_tensor!r}, received "
                                       f"{step.input_map[contract.INPUT_PIXELS]!r}")
        if step.model_version < -1 or step.model_version == 0:
            fail(f"{where}.model_version", f"expected -1 (latest) or a version >= 1, received {step.model_version}")
        members.append(Member(name=step.model_name,
                              version=None if step.model_version == -1 else int(step.model_version),
                              tensor=step.output_map[contract.OUTPUT_PROBABILITIES]))
    if not members:
        fail("ensemble_scheduling.step", "the ensemble has no member models")

    agg_index = agg_steps[0]
    agg = steps[agg_index]
    where = f"ensemble_scheduling.step[{agg_index}]"
    _expect_keys(f"{where}.input_map", agg.input_map, {m.name for m in members}, fail)
    for m in members:
        if agg.input_map[m.name] != m.tensor:
            fail(f"{where}.input_map", f"key {m.name!r} must read that member's output {m.tensor!r}, "
                                       f"received {agg.input_map[m.name]!r}")
    outputs: dict[str, str] = {}
    for key, tensor in agg.output_map.items():
        if key not in AGGREGATE_OUTPUTS:
            fail(f"{where}.output_map", f"unknown aggregate output {key!r}; expected some of {sorted(AGGREGATE_OUTPUTS)}")
        outputs[key] = tensor
    if contract.OUTPUT_PROBABILITIES not in outputs:
        fail(f"{where}.output_map", f"must produce {contract.OUTPUT_PROBABILITIES!r}")
    by_tensor = {tensor: key for key, tensor in outputs.items()}
    output_dims: dict[str, tuple[int, tuple[int, ...]]] = {}
    for name, i in declared.items():
        if name not in by_tensor:
            fail(f"output[{i}].name", f"output {name!r} is not produced by the {AGGREGATE_STEP!r} step")
        want_type, want_dims = AGGREGATE_OUTPUTS[by_tensor[name]]
        out = proto.output[i]
        got_type = model_config_pb2.DataType.Name(out.data_type)
        if got_type != want_type:
            fail(f"output[{i}].data_type", f"output {name!r} is {want_type}, received {got_type}")
        got_dims = _element_dims(out)
        if len(got_dims) != len(want_dims) or any(g != -1 and g < 1 for g in got_dims):
            fail(f"output[{i}].dims", f"output {name!r} has {len(want_dims)} dimension(s) after the batch "
                                      f"(-1 for variable), received {list(out.dims)}")
        output_dims[by_tensor[name]] = (i, got_dims)
    for tensor in outputs.values():
        if tensor not in declared:
            fail("output", f"the aggregate step produces {tensor!r} but no output declares it")

    outputs = {by_tensor[out.name]: out.name for out in proto.output}  # in declared order
    params = {key: value.string_value for key, value in proto.parameters.items()}
    config = _apply_parameters(
        EnsembleConfig(name=proto.name, version=version, members=tuple(members), tta=get_policy("none"),
                       max_batch_size=int(proto.max_batch_size), input_name=inp.name, outputs=outputs,
                       output_dims=output_dims, source=source),
        params, fail)
    weighted = [m for m in config.members if f"weight.{m.name}" in params and m.weight != 1.0]
    if weighted and config.aggregation == "mean":  # aggregate.mean ignores weights: a file giving both is a slip
        fail(f"parameters['weight.{weighted[0].name}']",
             f"aggregation 'mean' takes no weights, received {params[f'weight.{weighted[0].name}']!r}; use "
             "aggregation 'weighted_mean' (or 'geometric_mean') or leave the weights out")
    if labels_file is not None:
        config = replace(config, labels=_read_labels(labels_file, base_dir, source))
    _check_semantics(config)
    check_output_dims(config, len(config.labels) if config.labels is not None else None)
    return config


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _version(proto, fail) -> int:
    which = proto.version_policy.WhichOneof("policy_choice")
    if which is None:
        return 1
    if which != "specific" or len(proto.version_policy.specific.versions) != 1:
        fail("version_policy", "an ensemble serves one version: use specific { versions: N } or leave it out, "
                               f"received {which}")
    version = int(proto.version_policy.specific.versions[0])
    if version < 1:
        fail("version_policy.specific.versions", f"must be >= 1, received {version}")
    return version


def _check_supported_fields(proto, fail) -> None:
    """Refuse any ModelConfig field set that this ensemble does not read, naming it."""
    def check(message, kind: str, where: str) -> None:
        for descriptor, _ in message.ListFields():
            if descriptor.name not in SUPPORTED_FIELDS[kind]:
                fail(f"{where}{descriptor.name}", f"not supported by carclf's ensemble (it reads "
                                                  f"{', '.join(sorted(SUPPORTED_FIELDS[kind]))}); remove it")

    check(proto, "config", "")
    for i, tensor in enumerate(proto.input):
        check(tensor, "input", f"input[{i}].")
    for i, tensor in enumerate(proto.output):
        check(tensor, "output", f"output[{i}].")
    for i, step in enumerate(proto.ensemble_scheduling.step):
        check(step, "step", f"ensemble_scheduling.step[{i}].")


def _element_dims(tensor) -> tuple[int, ...]:
    """Dims of one batch element; Triton writes a scalar as dims [1] with reshape { shape: [] }."""
    if tensor.HasField("reshape"):
        return tuple(int(d) for d in tensor.reshape.shape)
    return tuple(int(d) for d in tensor.dims)


def _expect_keys(fld: str, mapping, expected: set[str], fail) -> None:
    got = set(mapping.keys())
    if got != expected:
        fail(fld, f"expected keys {sorted(expected)}, received {sorted(got)}")


def _check_dataflow(proto, steps, fail) -> None:
    """Every step input is an ensemble input or another step's output; no tensor is written twice."""
    produced: dict[str, str] = {i.name: "input" for i in proto.input}
    for i, step in enumerate(steps):
        if not step.model_name:
            fail(f"ensemble_scheduling.step[{i}].model_name", "a step needs a model_name")
        for tensor in step.output_map.values():
            if tensor in produced:
                fail(f"ensemble_scheduling.step[{i}].output_map", f"tensor {tensor!r} is already produced by "
                                                                  f"{produced[tensor]}")
            produced[tensor] = f"step {i} ({step.model_name})"
    for i, step in enumerate(steps):
        for key, tensor in step.input_map.items():
            if tensor not in produced:
                fail(f"ensemble_scheduling.step[{i}].input_map",
                     f"input {key!r} reads tensor {tensor!r}, which no input or step produces")


def _parse_number(kind, text: str, fld: str, fail, *, minimum=None, maximum=None, what: str = ""):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        fail(fld, f"expected {what or kind.__name__}, received {text!r}")
    if isinstance(value, float) and not math.isfinite(value):
        fail(fld, f"expected a finite number, received {text!r}")
    if minimum is not None and value < minimum:
        fail(fld, f"must be >= {minimum}, received {text!r}")
    if maximum is not None and value > maximum:
        fail(fld, f"must be <= {maximum}, received {text!r}")
    return value


def _apply_parameters(config: EnsembleConfig, params: Mapping[str, str], fail) -> EnsembleConfig:
    members = {m.name: m for m in config.members}
    changes: dict = {}
    retry = {}
    for key in sorted(params):
        value = params[key].strip()
        fld = f"parameters[{key!r}]"
        if "." in key:
            kind, _, member = key.partition(".")
            if kind not in _MEMBER_PARAMETERS:
                fail(fld, f"unknown per-member parameter {kind!r}; expected one of {list(_MEMBER_PARAMETERS)}")
            if member not in members:
                fail(fld, f"no member named {member!r}; members are {list(members)}")
            m = members[member]
            if kind == "weight":
                w = _parse_number(float, value, fld, fail, what="a weight (a number > 0)")
                if w <= 0:
                    fail(fld, f"a member weight must be > 0, received {value!r}")
                members[member] = replace(m, weight=w)
            elif kind == "version_label":
                if not LABEL_RE.match(value):
                    fail(fld, f"a version label is [a-zA-Z0-9_]+, received {value!r}")
                if m.version is not None:
                    fail(fld, f"member {member!r} names both model_version {m.version} and a version label")
                members[member] = replace(m, version_label=value)
            elif kind == "resize":
                if value not in imaging.RESIZE_MODES:
                    fail(fld, f"expected one of {list(imaging.RESIZE_MODES)}, received {value!r}")
                members[member] = replace(m, resize=value)
            else:
                parts = [part.strip() for part in value.split("x", 1)]
                if not all(contract.ascii_digits(part) for part in parts):
                    fail(fld, f"expected pixels: one side, or HEIGHTxWIDTH (integers), received {value!r}")
                sides = [int(part) for part in parts]
                if not all(8 <= side <= 4096 for side in sides):
                    fail(fld, f"each side must be 8 to 4096 pixels, received {value!r}")
                members[member] = replace(m, input_size=contract.plain_size(sides[0] if len(sides) == 1 else sides))
            continue
        if key not in _GLOBAL_PARAMETERS:
            fail(fld, f"unknown parameter; expected one of {list(_GLOBAL_PARAMETERS)} or "
                      f"'<{'|'.join(_MEMBER_PARAMETERS)}>.<member>'")
        if key == "tta_policy":
            changes["tta"] = _parse_policy(value, fld, fail)
        elif key == "aggregation":
            if value not in AGGREGATIONS:
                fail(fld, f"expected one of {list(AGGREGATIONS)}, received {value!r}")
            changes["aggregation"] = value
        elif key == "failure_policy":
            if value not in FAILURE_POLICIES:
                fail(fld, f"expected one of {list(FAILURE_POLICIES)}, received {value!r}")
            changes["failure_policy"] = value
        elif key == "top_k":
            changes["top_k"] = _parse_number(int, value, fld, fail, minimum=1, what="an integer")
        elif key == "deadline_ms":
            changes["deadline_s"] = _parse_number(float, value, fld, fail, minimum=1, maximum=600_000,
                                                  what="milliseconds") / 1000.0
        elif key == "quorum":
            changes["quorum"] = _parse_number(int, value, fld, fail, minimum=1, what="an integer")
        elif key == "degrade_on":
            codes = tuple(c.strip().upper() for c in value.split(",") if c.strip())
            from carclf.errors import ERRORS_BY_CODE
            bad = [c for c in codes if c not in ERRORS_BY_CODE]
            if not codes or bad:
                fail(fld, f"expected comma-separated status codes from {sorted(ERRORS_BY_CODE)}, received {value!r}")
            changes["degrade_on"] = codes
        elif key == "retry_max_attempts":
            retry["max_attempts"] = _parse_number(int, value, fld, fail, minimum=1, maximum=10, what="an integer")
        elif key == "retry_backoff_multiplier":
            retry["multiplier"] = _parse_number(float, value, fld, fail, minimum=1.0, what="a number")
        else:  # retry_initial_backoff_ms, retry_max_backoff_ms
            ms = _parse_number(float, value, fld, fail, minimum=0, maximum=60_000, what="milliseconds")
            retry["initial_backoff_s" if "initial" in key else "max_backoff_s"] = ms / 1000.0
    if retry:
        changes["retry"] = RetryPolicy(**{**RetryPolicy().__dict__, **retry})
        if changes["retry"].initial_backoff_s > changes["retry"].max_backoff_s:
            fail("parameters['retry_initial_backoff_ms']",
                 f"must not exceed retry_max_backoff_ms ({changes['retry'].max_backoff_s * 1000:g}), received "
                 f"{changes['retry'].initial_backoff_s * 1000:g}")
    ordered = tuple(members[m.name] for m in config.members)
    return replace(config, members=ordered, **changes)


def _parse_policy(value: str, fld: str, fail) -> TTAPolicy:
    """A policy name from carclf.tta, or a declared policy as JSON {"name": ..., "views": [...]}."""
    if value.startswith("{"):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as exc:
            fail(fld, f"a declared TTA policy must be JSON: {exc}; received {value!r}")
        try:
            return get_policy(data)
        except ConfigError as exc:
            fail(fld, exc.detail)
    try:
        return get_policy(value)
    except ConfigError as exc:
        fail(fld, exc.detail)


def _read_labels(name: str, base_dir, source: str) -> tuple[str, ...]:
    path = Path(base_dir or ".") / name
    try:
        labels = tuple(line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip())
    except OSError as exc:
        raise ConfigError(f"cannot read label file {str(path)!r}: {exc}", source=source,
                          field="output.label_filename") from None
    if len(labels) < 2:
        raise ConfigError(f"label file {str(path)!r} holds {len(labels)} labels, expected at least 2",
                          source=source, field="output.label_filename")
    return labels


def check_output_dims(config: EnsembleConfig, classes: int | None) -> None:
    """ConfigError naming ``output[i].dims`` when a fixed (not -1) dimension disagrees with what the ensemble
    answers: the number of members, of classes (``classes``, None while unknown: checked again once the
    members' labels are read) or of top-k classes."""
    top_k = min(config.top_k, classes) if classes is not None else None
    sizes = {"classes": classes, "members": len(config.members), "top-k classes": top_k}
    meaning = {contract.OUTPUT_PROBABILITIES: ("classes",), "top_k_labels": ("top-k classes",),
               "top_k_probabilities": ("top-k classes",), "member_probabilities": ("members", "classes")}
    for key, (index, dims) in config.output_dims.items():
        what = meaning.get(key, ("members",) * len(dims))
        for got, kind in zip(dims, what, strict=True):
            if got != -1 and sizes[kind] is not None and got != sizes[kind]:
                raise ConfigError(f"output {config.outputs[key]!r} declares {got} {kind}, but the ensemble has "
                                  f"{sizes[kind]}; declare -1 (variable) or {sizes[kind]}", source=config.source,
                                  field=f"output[{index}].dims")


def _check_semantics(config: EnsembleConfig) -> None:
    """Cross-field rules, checked after parameters and after programmatic overrides."""
    def fail(fld: str, message: str):
        raise ConfigError(message, source=config.source, field=fld)

    if config.aggregation not in AGGREGATIONS:
        fail("parameters['aggregation']", f"expected one of {list(AGGREGATIONS)}, received {config.aggregation!r}")
    if config.failure_policy not in FAILURE_POLICIES:
        fail("parameters['failure_policy']", f"expected one of {list(FAILURE_POLICIES)}, "
                                             f"received {config.failure_policy!r}")
    if config.quorum > len(config.members):
        fail("parameters['quorum']", f"quorum {config.quorum} is larger than the {len(config.members)} members")
    if config.failure_policy == "fail" and config.quorum not in (1, len(config.members)):
        fail("parameters['quorum']", "a quorum only applies with failure_policy 'degrade', received "
                                     f"quorum {config.quorum} with failure_policy 'fail'")
    if config.failure_policy == "fail" and config.degrade_on != DEFAULT_DEGRADE_ON:
        fail("parameters['degrade_on']", "the codes members may fail with only apply with failure_policy "
                                         f"'degrade', received degrade_on {','.join(config.degrade_on)!r} with "
                                         "failure_policy 'fail'")
    if config.deadline_s <= 0:
        fail("parameters['deadline_ms']", f"must be > 0, received {config.deadline_s * 1000:g}")
    for m in config.members:
        if not m.weight > 0:
            fail(f"parameters['weight.{m.name}']", f"a member weight must be > 0, received {m.weight}")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def render(
    name: str,
    members: Mapping[str, int] | list[str] | tuple[str, ...],
    *,
    parameters: Mapping[str, object] | None = None,
    outputs: tuple[str, ...] = tuple(AGGREGATE_OUTPUTS),
    max_batch_size: int = 64,
    version: int = 1,
) -> str:
    """The ``config.pbtxt`` text of an ensemble over ``members`` (name -> model_version, -1 latest).

    Built with Triton's schema and ``text_format``, so what it writes always parses; used by tooling and
    tests that need an ensemble over other models than the shipped one.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    if not isinstance(members, Mapping):
        members = {m: -1 for m in members}
    proto = pb.ModelConfig(name=name, platform=PLATFORM, max_batch_size=max_batch_size)
    proto.version_policy.specific.versions.append(version)
    inp = proto.input.add(name=contract.INPUT_IMAGE_BYTES, data_type=pb.TYPE_STRING, dims=[1])
    inp.reshape.SetInParent()
    for key in outputs:
        dtype, dims = AGGREGATE_OUTPUTS[key]
        out = proto.output.add(name=key, data_type=pb.DataType.Value(dtype), dims=list(dims) or [1])
        if not dims:
            out.reshape.SetInParent()
    steps = proto.ensemble_scheduling.step
    tta = steps.add(model_name=TTA_STEP, model_version=-1)
    tta.input_map[contract.INPUT_IMAGE_BYTES] = contract.INPUT_IMAGE_BYTES
    tta.output_map[VIEWS_KEY] = VIEWS_KEY
    for member, member_version in members.items():
        step = steps.add(model_name=member, model_version=int(member_version))
        step.input_map[contract.INPUT_PIXELS] = VIEWS_KEY
        step.output_map[contract.OUTPUT_PROBABILITIES] = f"{member}_probabilities"
    agg = steps.add(model_name=AGGREGATE_STEP, model_version=-1)
    for member in members:
        agg.input_map[member] = f"{member}_probabilities"
    for key in outputs:
        agg.output_map[key] = key
    for key, value in (parameters or {}).items():
        proto.parameters[key].string_value = str(value)
    return text_format.MessageToString(proto)

"""TF Serving's BatchingParameters, MonitoringConfig and SSLConfig messages.

tensorflow-serving-api ships ``model_server_config_pb2`` (used directly by ``carclf.serving.config``)
but not ``session_bundle_config.proto``, ``monitoring_config.proto`` nor ``ssl_config.proto``. These
messages are declared here with the official package, message names, field names, numbers and types
(tensorflow_serving/servables/tensorflow/session_bundle_config.proto, tensorflow_serving/config/
monitoring_config.proto and ssl_config.proto), in a private descriptor pool so that they never clash with a
generated module.
Text files written for ``tensorflow_model_server`` therefore parse here unchanged, and vice versa.
"""

from __future__ import annotations

from functools import cache

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

_F = descriptor_pb2.FieldDescriptorProto

# (name, number, type, label, message type)
_BATCHING_FIELDS = [
    ("max_batch_size", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
    ("batch_timeout_micros", 2, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
    ("max_enqueued_batches", 3, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
    ("num_batch_threads", 4, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.Int64Value"),
    ("thread_pool_name", 5, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".google.protobuf.StringValue"),
    ("allowed_batch_sizes", 6, _F.TYPE_INT64, _F.LABEL_REPEATED, None),
    ("pad_variable_length_inputs", 7, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
]
_PROMETHEUS_FIELDS = [
    ("enable", 1, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
    ("path", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
]
_MONITORING_FIELDS = [
    ("prometheus_config", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".tensorflow.serving.PrometheusConfig"),
]
_SSL_FIELDS = [  # the PEM texts themselves, not paths
    ("server_key", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
    ("server_cert", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
    ("custom_ca", 3, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None),
    ("client_verify", 4, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, None),
]


def _message(file: descriptor_pb2.FileDescriptorProto, name: str, fields) -> None:
    message = file.message_type.add(name=name)
    for field_name, number, typ, label, type_name in fields:
        field = message.field.add(name=field_name, number=number, type=typ, label=label)
        if type_name:
            field.type_name = type_name


@cache
def _pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    file = descriptor_pb2.FileDescriptorProto(
        name="carclf/serving/tensorflow_serving_config_mirror.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    _message(file, "BatchingParameters", _BATCHING_FIELDS)
    _message(file, "PrometheusConfig", _PROMETHEUS_FIELDS)
    _message(file, "MonitoringConfig", _MONITORING_FIELDS)
    _message(file, "SSLConfig", _SSL_FIELDS)
    pool.Add(file)
    return pool


def message_class(full_name: str):
    return message_factory.GetMessageClass(_pool().FindMessageTypeByName(full_name))


def BatchingParameters(**kwargs):  # noqa: N802 - mirrors the generated class name
    return message_class("tensorflow.serving.BatchingParameters")(**kwargs)


def MonitoringConfig(**kwargs):  # noqa: N802
    return message_class("tensorflow.serving.MonitoringConfig")(**kwargs)


def SSLConfig(**kwargs):  # noqa: N802
    return message_class("tensorflow.serving.SSLConfig")(**kwargs)

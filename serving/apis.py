"""TF Serving API messages built from the server's state, shared by the gRPC and REST transports.

Model status and model metadata are built once as the official protos; REST prints them as TF Serving
does (protobuf JSON with TF Serving's field names, defaults included).
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import json_format
from tensorflow.core.protobuf import error_codes_pb2, meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2

from carclf.errors import InvalidInput
from carclf.serving.manager import Lease, ModelManager
from carclf.serving.servable import Servable, TensorInfo
from carclf.tensors import datatype_of, shape_proto

SIGNATURE_DEF_FIELD = "signature_def"


def fill_model_spec(spec: model_pb2.ModelSpec, name: str, version: int | None, signature_name: str = "") -> None:
    spec.name = name
    if version is not None:
        spec.version.value = version
    spec.signature_name = signature_name


def status_response(manager: ModelManager, name: str, version: int | None = None,
                    label: str | None = None) -> get_model_status_pb2.GetModelStatusResponse:
    response = get_model_status_pb2.GetModelStatusResponse()
    for status in manager.status(name, version, label):
        entry = response.model_version_status.add(version=status.version, state=int(status.state))
        entry.status.error_code = error_codes_pb2.Code.Value(status.error_code)
        entry.status.error_message = status.error_message
    return response


def _tensor_info(info: TensorInfo) -> meta_graph_pb2.TensorInfo:
    return meta_graph_pb2.TensorInfo(name=info.tensor_name or info.name, dtype=datatype_of(info.dtype),
                                     tensor_shape=shape_proto(info.shape))


def signature_def_map(servable: Servable) -> get_model_metadata_pb2.SignatureDefMap:
    result = get_model_metadata_pb2.SignatureDefMap()
    for name, signature in sorted(servable.signatures().items()):
        proto = result.signature_def[name]
        proto.method_name = signature.method_name
        for alias, info in signature.inputs.items():
            proto.inputs[alias].CopyFrom(_tensor_info(info))
        for alias, info in signature.outputs.items():
            proto.outputs[alias].CopyFrom(_tensor_info(info))
    return result


def metadata_response(lease: Lease, fields: Sequence[str]) -> get_model_metadata_pb2.GetModelMetadataResponse:
    if not fields:
        raise InvalidInput("GetModelMetadataRequest must specify at least one metadata_field")
    for field in fields:
        if field != SIGNATURE_DEF_FIELD:
            raise InvalidInput(f"Metadata field {field} is not supported")
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    fill_model_spec(response.model_spec, lease.model_name, lease.version)
    response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_def_map(lease.servable))
    return response


def status_json(response: get_model_status_pb2.GetModelStatusResponse) -> dict:
    return json_format.MessageToDict(response, always_print_fields_with_no_presence=True)


def metadata_json(response: get_model_metadata_pb2.GetModelMetadataResponse) -> dict:
    """``{"model_spec": {...}, "metadata": {"signature_def": {"signature_def": {...}}}}``, as TF Serving."""
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    response.metadata[SIGNATURE_DEF_FIELD].Unpack(signature_defs)
    options = {"always_print_fields_with_no_presence": True, "preserving_proto_field_name": True}
    return {
        "model_spec": json_format.MessageToDict(response.model_spec, **options),
        "metadata": {SIGNATURE_DEF_FIELD: json_format.MessageToDict(signature_defs, **options)},
    }

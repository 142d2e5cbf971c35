"""Helpers of ``carclf predict``'s tests: a stand-in gRPC PredictionService whose answers and refusals the test
chooses, and the command's own stderr lines."""

from __future__ import annotations

import contextlib

import numpy as np

from tests.grpc_stubs import serving_prediction_service


class Refusal(Exception):
    """Raised by a stub's ``outputs_for``: the Predict is answered with this gRPC status instead."""

    def __init__(self, code: str, details: str):
        super().__init__(details)
        self.code, self.details = code, details


def own_lines(stderr: str) -> list[str]:
    """The command's own stderr lines (not TensorFlow's start-up logging, nor the progress bar)."""
    return [line for line in stderr.splitlines() if line.startswith("carclf predict:")]


@contextlib.contextmanager
def stub_prediction_service(outputs_for):
    """A gRPC PredictionService standing in for a server: its metadata says serving_default takes image_bytes
    (as every photo model's does); Predict answers ``outputs_for(the photos sent, as bytes)`` (name -> numpy array), checking
    and applying output_filter as TF Serving does. Yields its grpc:// URL."""
    import grpc
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.framework.tensor_pb2 import TensorProto
    from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

    from carclf.tensors import make_proto

    class Service(prediction_service_pb2_grpc.PredictionServiceServicer):
        def GetModelMetadata(self, request, context):  # noqa: N802 - the service's name
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = request.model_spec.name
            signatures = get_model_metadata_pb2.SignatureDefMap()
            signature = signatures.signature_def["serving_default"]
            signature.method_name = "tensorflow/serving/predict"
            signature.inputs["image_bytes"].dtype = types_pb2.DT_STRING
            response.metadata["signature_def"].Pack(signatures)
            return response

        def Predict(self, request, context):  # noqa: N802 - the service's name
            response = predict_pb2.PredictResponse()
            response.model_spec.name = request.model_spec.name
            response.model_spec.version.value = 1
            try:
                outputs = outputs_for(list(request.inputs["image_bytes"].string_val))
            except Refusal as refusal:
                context.abort(getattr(grpc.StatusCode, refusal.code), refusal.details)
            for name in request.output_filter:  # TF Serving's check of output_filter
                if name not in outputs:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"output tensor alias not found in "
                                  f"signature: {name} Outputs expected to be in the set {{{','.join(outputs)}}}.")
            for name, value in outputs.items():
                if not request.output_filter or name in request.output_filter:
                    response.outputs[name].CopyFrom(value if isinstance(value, TensorProto) else make_proto(value))
            return response

    with serving_prediction_service(Service()) as port:
        yield f"grpc://127.0.0.1:{port}"


def backbone_answer(photos: int, rows: int | None = None, drop: tuple[str, ...] = (), probabilities=None) -> dict:
    """A backbone's answer for ``photos`` photos (``rows`` rows instead, ``drop`` outputs left out)."""
    rows = photos if rows is None else rows
    answer = {"probabilities": np.tile(np.array([[0.25, 0.75]], dtype=np.float32), (rows, 1)),
              "class_id": np.ones(rows, dtype=np.int64), "label": np.array([b"BMW X5"] * rows, dtype=object)}
    if probabilities is not None:
        answer["probabilities"] = probabilities(rows)
    return {name: value for name, value in answer.items() if name not in drop}

"""Every request gives back its hold on the version that answered it, also when its body cannot be decoded:
a leaked hold would keep that version from ever finishing its unload. And two edge cases of the request
surface: a repeated output alias, a server with no model configured."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from tests.serving.conformance_setup import MODEL
from tests.serving.conftest import Rest
from tests.serving.test_grpc import predict_request
from tests.serving.test_rest import b64


def held(server) -> dict[tuple[str, int], int]:
    """Requests holding each loaded version now (the manager's count)."""
    return {(name, version): entry.inflight for name, model in server.manager._models.items()
            for version, entry in model.versions.items()}


def test_requests_whose_bodies_do_not_decode_release_their_version(private_server, conformance_repository, jpegs):
    server = private_server(model_name=MODEL, model_base_path=str(conformance_repository / MODEL),
                            enable_model_warmup=False)
    rest = Rest(f"http://127.0.0.1:{server.rest_port}")
    assert rest.post(f"/v1/models/{MODEL}:predict", {"instances": [{"b64": "%% not base64"}]}).status == 400
    broken = predict_request(MODEL)  # a float tensor of 3 values whose content holds 5 bytes
    broken.inputs["image_bytes"].CopyFrom(tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, tensor_content=b"12345",
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=3)])))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(broken, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub.Predict(predict_request(MODEL, image_bytes=np.array(jpegs[:1], dtype=object)), timeout=30)
    assert rest.post(f"/v1/models/{MODEL}:predict", {"instances": [b64(jpegs[0])]}).status == 200
    counts = held(server)
    assert counts and all(n == 0 for n in counts.values()), counts


def test_an_output_alias_asked_for_twice_is_refused(private_server, conformance_repository, jpegs):
    server = private_server(model_name=MODEL, model_base_path=str(conformance_repository / MODEL),
                            enable_model_warmup=False)
    request = predict_request(MODEL, output_filter=["probabilities", "probabilities"],
                              image_bytes=np.array(jpegs[:1], dtype=object))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "duplicate output tensor alias: probabilities" in caught.value.details()


@pytest.mark.extension
def test_a_server_with_no_model_configured_is_not_ready(private_server, tmp_path):
    models = tmp_path / "models.config"
    models.write_text("model_config_list {}")
    server = private_server(model_config_file=str(models), model_repository=str(tmp_path))
    reply = Rest(f"http://127.0.0.1:{server.rest_port}").get("/v1/ready")
    assert reply.status == 503 and reply.json["error"] == "no model is configured", reply.json

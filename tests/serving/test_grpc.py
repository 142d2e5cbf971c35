"""gRPC conformance: PredictionService, ModelService and grpc.health.v1 (embedded server or a real one)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    predict_pb2,
    regression_pb2,
)

from carclf.tensors import make_proto, to_ndarray
from tests.serving.conformance_setup import CANARY, ECHO_MODEL, MODEL, OTHER_MODEL, STABLE

LATEST = max(STABLE, CANARY)


def predict_request(model: str = MODEL, *, version=None, label=None, signature="", output_filter=(), **inputs):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    request.model_spec.signature_name = signature
    request.output_filter.extend(output_filter)
    for name, array in inputs.items():
        request.inputs[name].CopyFrom(make_proto(np.asarray(array)))
    return request


def outputs(response) -> dict[str, np.ndarray]:
    return {name: to_ndarray(proto) for name, proto in response.outputs.items()}


def expect_code(call, code: grpc.StatusCode, needle: str = "") -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, (info.value.code(), info.value.details())
    assert needle.lower() in (info.value.details() or "").lower(), info.value.details()
    return info.value.details()


def images(jpegs) -> np.ndarray:
    return np.array(jpegs, dtype=object)


def test_predict_latest_echoes_model_spec(prediction_stub, reference, jpegs):
    response = prediction_stub.Predict(predict_request(image_bytes=images(jpegs)), timeout=30)
    assert response.model_spec.name == MODEL
    assert response.model_spec.version.value == LATEST
    assert response.model_spec.signature_name == "serving_default"
    got, expected = outputs(response), reference(MODEL, LATEST, image_bytes=images(jpegs))
    np.testing.assert_allclose(got["probabilities"], expected["probabilities"], atol=1e-5)
    np.testing.assert_array_equal(got["class_id"], expected["class_id"])
    np.testing.assert_array_equal(got["label"], expected["label"])


@pytest.mark.parametrize("spec,version", [
    ({"version": STABLE}, STABLE), ({"version": CANARY}, CANARY),
    ({"label": "stable"}, STABLE), ({"label": "canary"}, CANARY),
])
def test_predict_by_version_and_label(prediction_stub, reference, jpegs, spec, version):
    response = prediction_stub.Predict(predict_request(image_bytes=images(jpegs[:2]), **spec), timeout=30)
    assert response.model_spec.version.value == version
    expected = reference(MODEL, version, image_bytes=images(jpegs[:2]))
    np.testing.assert_allclose(outputs(response)["probabilities"], expected["probabilities"], atol=1e-5)


def test_predict_pixels_signature_with_output_filter(prediction_stub, reference):
    pixels = np.random.default_rng(1).integers(0, 256, (3, 40, 30, 3), dtype=np.uint8)
    request = predict_request(OTHER_MODEL, signature="serving_pixels", output_filter=["class_id"], pixels=pixels)
    response = prediction_stub.Predict(request, timeout=30)
    assert set(response.outputs) == {"class_id"}
    assert response.model_spec.signature_name == "serving_pixels"
    expected = reference(OTHER_MODEL, 1, "serving_pixels", pixels=pixels)
    np.testing.assert_array_equal(outputs(response)["class_id"], expected["class_id"])


def test_predict_bytes_round_trip(prediction_stub):
    data = np.array([b"\x00\x01\xfe", b"", b"plain"], dtype=object)
    response = prediction_stub.Predict(predict_request(ECHO_MODEL, data_bytes=data), timeout=30)
    np.testing.assert_array_equal(outputs(response)["echo_bytes"], data)


@pytest.mark.parametrize("kwargs,code,needle", [
    ({"model": "no_such_model"}, grpc.StatusCode.NOT_FOUND, "Servable not found"),
    ({"version": 99}, grpc.StatusCode.NOT_FOUND, "Servable not found"),
    ({"label": "no_such_label"}, grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label"),
    ({"signature": "no_such_signature"}, grpc.StatusCode.FAILED_PRECONDITION, "no_such_signature"),
    ({"output_filter": ["no_such_output"]}, grpc.StatusCode.INVALID_ARGUMENT, "no_such_output"),
])
def test_predict_errors(prediction_stub, jpegs, kwargs, code, needle):
    expect_code(lambda: prediction_stub.Predict(predict_request(image_bytes=images(jpegs[:1]), **kwargs), timeout=30),
                code, needle)


@pytest.mark.parametrize("inputs,needle", [
    ({"wrong_name": np.array([b"x"], dtype=object)}, "wrong_name"),
    ({"image_bytes": np.array([1.0, 2.0], dtype=np.float32)}, ""),
    ({"image_bytes": np.array([b"a"], dtype=object), "extra": np.array([b"b"], dtype=object)}, "extra"),
    ({}, "image_bytes"),
])
def test_predict_bad_inputs(prediction_stub, inputs, needle):
    expect_code(lambda: prediction_stub.Predict(predict_request(**inputs), timeout=30),
                grpc.StatusCode.INVALID_ARGUMENT, needle)


def test_predict_wrong_shape(prediction_stub):
    pixels = np.zeros((2, 8, 8), dtype=np.uint8)  # rank 3 where [batch, H, W, 3] is expected
    expect_code(lambda: prediction_stub.Predict(predict_request(signature="serving_pixels", pixels=pixels),
                                                timeout=30), grpc.StatusCode.INVALID_ARGUMENT)


def test_model_metadata(prediction_stub):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = MODEL
    request.model_spec.version.value = STABLE
    response = prediction_stub.GetModelMetadata(request, timeout=30)
    assert response.model_spec.name == MODEL and response.model_spec.version.value == STABLE
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_defs)
    default = signature_defs.signature_def["serving_default"]
    assert default.method_name == "tensorflow/serving/predict"
    assert default.inputs["image_bytes"].dtype == 7  # DT_STRING
    assert [d.size for d in default.outputs["probabilities"].tensor_shape.dim][0] == -1
    request.metadata_field[:] = ["no_such_field"]
    expect_code(lambda: prediction_stub.GetModelMetadata(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT)


def test_model_status(model_stub):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = MODEL
    response = model_stub.GetModelStatus(request, timeout=30)
    states = {s.version: s.state for s in response.model_version_status}
    assert states[STABLE] == states[CANARY] == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert all(s.status.error_code == 0 for s in response.model_version_status)
    request.model_spec.version.value = CANARY
    assert [s.version for s in model_stub.GetModelStatus(request, timeout=30).model_version_status] == [CANARY]
    request.model_spec.version.value = 99
    expect_code(lambda: model_stub.GetModelStatus(request, timeout=30), grpc.StatusCode.NOT_FOUND)
    unknown = get_model_status_pb2.GetModelStatusRequest()
    unknown.model_spec.name = "no_such_model"
    expect_code(lambda: model_stub.GetModelStatus(unknown, timeout=30), grpc.StatusCode.NOT_FOUND, "no_such_model")


def test_classify_regress_multi_inference_without_such_signatures(prediction_stub):
    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = MODEL
    expect_code(lambda: prediction_stub.Classify(classify, timeout=30), grpc.StatusCode.INVALID_ARGUMENT,
                "method_name")
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name = MODEL
    expect_code(lambda: prediction_stub.Regress(regress, timeout=30), grpc.StatusCode.INVALID_ARGUMENT,
                "method_name")
    multi = inference_pb2.MultiInferenceRequest()
    task = multi.tasks.add(method_name="tensorflow/serving/classify")
    task.model_spec.name = MODEL
    expect_code(lambda: prediction_stub.MultiInference(multi, timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
    classify.model_spec.name = "no_such_model"
    expect_code(lambda: prediction_stub.Classify(classify, timeout=30), grpc.StatusCode.NOT_FOUND)


def test_requests_without_a_model_spec_or_mixing_models_are_invalid_argument(prediction_stub, model_stub):
    """TF Serving refuses a request without a ModelSpec as INVALID_ARGUMENT "Missing ModelSpec" (not NOT_FOUND
    for a model named ""), and a MultiInference whose tasks name different models, before any lookup."""
    expect_code(lambda: model_stub.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(), timeout=30),
                grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    expect_code(lambda: prediction_stub.GetModelMetadata(metadata, timeout=30), grpc.StatusCode.INVALID_ARGUMENT,
                "Missing ModelSpec")
    multi = inference_pb2.MultiInferenceRequest()
    for model in ("no_such_model", MODEL):
        multi.tasks.add(method_name="tensorflow/serving/classify").model_spec.name = model
    expect_code(lambda: prediction_stub.MultiInference(multi, timeout=30), grpc.StatusCode.INVALID_ARGUMENT,
                "same model name")


def test_health_service(channel):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_concurrent_predicts_all_match(prediction_stub, reference, jpegs):
    from concurrent.futures import ThreadPoolExecutor

    expected = reference(MODEL, LATEST, image_bytes=images(jpegs))["probabilities"]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(prediction_stub.Predict, predict_request(image_bytes=images([jpegs[i % 4]])), timeout=60)
                   for i in range(32)]
        for i, future in enumerate(futures):
            np.testing.assert_allclose(outputs(future.result())["probabilities"][0], expected[i % 4], atol=1e-5)


@pytest.mark.extension
def test_oversized_message_is_refused(private_server, conformance_repository):
    server = private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                            max_request_bytes=64 * 1024, rest_api_port=0)
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        big = np.array([b"x" * (128 * 1024)], dtype=object)
        expect_code(lambda: stub.Predict(predict_request(OTHER_MODEL, image_bytes=big), timeout=30),
                    grpc.StatusCode.RESOURCE_EXHAUSTED)

"""The ensemble hook: ``carclf.ensemble.servable.load(path, predictor) -> Servable`` served like a model.

The ensemble itself is tested in tests/ensemble; here a small stand-in module honours the same contract
(average two members through ``predictor.predict``) so that the server's side is checked on its own:
status AVAILABLE, metadata, gRPC Predict, REST :predict, metrics, errors from members, and the clear
error when the ensemble package cannot be imported.
"""

from __future__ import annotations

import sys
import types

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc

import carclf.ensemble
from carclf.errors import ConfigError
from carclf.serving.predictor import PredictResult
from carclf.serving.servable import Servable, Signature, TensorInfo
from tests.serving.conformance_setup import MODEL, OTHER_MODEL
from tests.serving.conftest import Rest
from tests.serving.test_grpc import outputs, predict_request
from tests.serving.test_rest import b64

MEMBERS = (MODEL, OTHER_MODEL)


class MeanEnsemble(Servable):
    """Average of the members' probabilities, called through the server's in-process predictor."""

    batchable = False

    def __init__(self, path: str, predictor):
        self.name, self.version, self.path, self.predictor = "mean_ensemble", 7, path, predictor
        self.member_versions: list[int] = []
        signature = Signature("serving_default", "tensorflow/serving/predict",
                              {"image_bytes": TensorInfo("image_bytes", "object", (-1,))},
                              {"probabilities": TensorInfo("probabilities", "float32", (-1, -1))})
        self._signatures = {"serving_default": signature}

    def signatures(self):
        return self._signatures

    def predict(self, signature_name, inputs, *, output_filter=(), deadline=None, cancel=None):
        results = [self.predictor.predict(member, dict(inputs), output_filter=("probabilities",), deadline=deadline,
                                          cancel=cancel)
                   for member in MEMBERS]
        assert all(isinstance(r, PredictResult) for r in results)
        self.member_versions = [r.version for r in results]
        return {"probabilities": np.mean([r.outputs["probabilities"] for r in results], axis=0)}


@pytest.fixture
def stand_in_ensemble(monkeypatch, tmp_path):
    module = types.ModuleType("carclf.ensemble.servable")
    module.load = lambda path, predictor: MeanEnsemble(path, predictor)
    monkeypatch.setitem(sys.modules, "carclf.ensemble.servable", module)
    monkeypatch.setattr(carclf.ensemble, "servable", module, raising=False)
    config = tmp_path / "config.pbtxt"
    config.write_text('name: "mean_ensemble"\nplatform: "ensemble"\n')
    return config


def test_ensemble_is_served_like_a_model(private_server, conformance_repository, stand_in_ensemble, reference, jpegs):
    server = private_server(model_config_file=str(conformance_repository / "models.config"),
                            model_repository=str(conformance_repository), enable_model_warmup=False,
                            enable_batching=True, ensemble_config_file=[str(stand_in_ensemble)],
                            monitoring_config_file=str(conformance_repository / "monitoring.config"))
    data = np.array(jpegs[:2], dtype=object)
    expected = np.mean([reference(MODEL, 2, image_bytes=data)["probabilities"],
                        reference(OTHER_MODEL, 1, image_bytes=data)["probabilities"]], axis=0)
    rest = Rest(f"http://127.0.0.1:{server.rest_port}")
    status = rest.get("/v1/models/mean_ensemble").json["model_version_status"]
    assert status == [{"version": "7", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]
    metadata = rest.get("/v1/models/mean_ensemble/metadata").json
    assert metadata["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["image_bytes"][
        "dtype"] == "DT_STRING"

    stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    response = stub.Predict(predict_request("mean_ensemble", image_bytes=data), timeout=30)
    assert response.model_spec.name == "mean_ensemble" and response.model_spec.version.value == 7
    np.testing.assert_allclose(outputs(response)["probabilities"], expected, atol=1e-5)

    reply = rest.post("/v1/models/mean_ensemble:predict", {"instances": [b64(j) for j in jpegs[:2]]})
    assert reply.status == 200
    np.testing.assert_allclose(reply.json["predictions"], expected, atol=1e-5)

    bad = rest.post("/v1/models/mean_ensemble:predict", {"instances": [b64(b"not a photo")]})
    assert bad.status == 400 and "not a recognised image" in bad.json["error"]

    text = rest.get("/monitoring/prometheus/metrics").body.decode()
    assert ':tensorflow:serving:request_count{model_name="mean_ensemble",status="OK"}' in text
    assert 'entrypoint="IN_PROCESS"' in text  # the members' calls went through the predictor

    result = server.predictor.predict("mean_ensemble", {"image_bytes": data})
    assert (result.model_name, result.version, result.signature_name) == ("mean_ensemble", 7, "serving_default")


def test_ensemble_flag_without_the_ensemble_package_is_a_clear_error(monkeypatch, private_server,
                                                                      conformance_repository, tmp_path):
    monkeypatch.setitem(sys.modules, "carclf.ensemble.servable", None)  # import fails
    monkeypatch.delattr(carclf.ensemble, "servable", raising=False)
    config = tmp_path / "config.pbtxt"
    config.write_text('name: "e"\n')
    with pytest.raises(ConfigError, match="carclf.ensemble.servable"):
        private_server(model_name=OTHER_MODEL, model_base_path=str(conformance_repository / OTHER_MODEL),
                       enable_model_warmup=False, ensemble_config_file=[str(config)])

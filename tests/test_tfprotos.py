"""carclf.tfprotos: TF Serving's protocol modules without TensorFlow's runtime, and TensorFlow after them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import tensorflow as tf

from carclf import tfprotos
from carclf.tensors import make_proto, to_ndarray


def run_python(code: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# every child defines started(): the TensorFlow modules it has loaded, [] while TensorFlow's runtime has not started
PRELUDE = """import json, sys
def started():
    return sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.python"))
"""

TENSORFLOW_AFTER = PRELUDE + """
import numpy as np
from carclf import tfprotos
from carclf.tensors import make_proto
before = started()
request = tfprotos.predict_pb2.PredictRequest()
request.inputs["x"].CopyFrom(make_proto(np.array([[1.5, -2.0]], dtype=np.float32)))
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import predict_pb2
made_by_tf = tf.make_tensor_proto(np.array([3, 4], dtype=np.int32))
request.inputs["y"].CopyFrom(made_by_tf)
again = predict_pb2.PredictRequest.FromString(request.SerializeToString())
print(json.dumps({
    "before": before, "after": started(),
    "same_classes": [type(request.inputs["x"]) is tensor_pb2.TensorProto, predict_pb2.PredictRequest is type(request),
                     tfprotos.tensor_pb2.TensorProto is tensor_pb2.TensorProto],
    "x": tf.make_ndarray(again.inputs["x"]).tolist(), "y": tf.make_ndarray(again.inputs["y"]).tolist(),
    "sum": float(tf.reduce_sum(tf.constant(tf.make_ndarray(again.inputs["x"])))),
}))
"""


def test_tensorflow_started_after_the_protocol_modules_shares_their_messages():
    """Messages made before TensorFlow starts are TensorFlow's own messages once it runs, both ways."""
    seen = run_python(TENSORFLOW_AFTER)
    assert seen["before"] == [] and "tensorflow" in seen["after"] and "tensorflow.python" in seen["after"]
    assert seen["same_classes"] == [True, True, True]
    assert seen["x"] == [[1.5, -2.0]] and seen["y"] == [3, 4] and seen["sum"] == -0.5


FALLBACK = PRELUDE + """
import importlib.util
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "tensorflow" else real(name, *a)
from carclf import tfprotos
importlib.util.find_spec = real
request = tfprotos.predict_pb2.PredictRequest()
request.model_spec.name = "m"
print(json.dumps({"started": started(), "name": tfprotos.predict_pb2.PredictRequest.FromString(request.SerializeToString()).model_spec.name}))
"""


def test_when_the_bare_load_fails_the_modules_come_through_tensorflow():
    seen = run_python(FALLBACK)
    assert "tensorflow.python" in seen["started"] and seen["name"] == "m"


def test_with_tensorflow_running_the_modules_are_its_own():
    assert "tensorflow" in sys.modules  # this test process runs TensorFlow
    for name, module in zip(tfprotos.MODULES, tfprotos.load(), strict=True):
        assert sys.modules[name] is module
    assert tfprotos.tensor_pb2.TensorProto is type(tf.make_tensor_proto(1.0))
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(tf.make_ndarray(make_proto(array)), array)
    assert np.array_equal(to_ndarray(tf.make_tensor_proto(array)), array)


COMMAND = PRELUDE + """
import contextlib, io
from carclf.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    status = main(sys.argv[1:])
print(json.dumps({"status": status, "out": out.getvalue(), "started": started()}))
"""


def test_client_side_commands_and_the_load_generator_never_start_tensorflow(tiny_repository_template):
    """``carclf serving-config`` writes a models.config TF Serving's own parser reads, and importing the locust
    file builds its workload machinery, each without TensorFlow's runtime."""
    from google.protobuf import text_format

    seen = run_python(COMMAND, "serving-config", "--repository", str(tiny_repository_template), "--output", "-")
    assert seen["status"] == 0 and seen["started"] == []
    config = text_format.Parse(seen["out"], tf_serving_config())
    assert sorted(m.name for m in config.model_config_list.config) == ["tiny_a", "tiny_b"]
    seen = run_python(PRELUDE + "import carclf.loadtest.locustfile\nimport carclf.loadtest.run\n"
                                "print(json.dumps({'started': started()}))")
    assert seen["started"] == []


def tf_serving_config():
    from tensorflow_serving.config import model_server_config_pb2

    return model_server_config_pb2.ModelServerConfig()

"""TensorFlow's and TF Serving's generated protocol modules, loaded without starting TensorFlow.

TF Serving's Python API (tensorflow-serving-api) is generated code that imports TensorFlow's own
protocol modules (``tensorflow.core.framework.tensor_pb2``...), and importing anything under
``tensorflow`` runs ``tensorflow/__init__.py`` first: about 5 s and 600 MB for a client, a load
generator or a config writer that only builds and reads messages.

When TensorFlow is not loaded yet, the modules below are loaded with a bare ``tensorflow`` package
(its folder, none of its code) standing in for the real one, which is then taken out of
``sys.modules`` together with the ``tensorflow.*`` modules loaded through it. A later
``import tensorflow`` in the same process therefore starts from scratch and loads those protocol
modules again; the protocol buffer runtime accepts a file added twice with the same content and
hands back the same descriptors and message classes, so messages made here and there mix freely.
Where TensorFlow is loaded already, or the bare load fails, the modules are imported as usual.

Import the modules from here (``from carclf.tfprotos import predict_pb2``), not from their packages:
an ``import tensorflow.core...`` elsewhere would start TensorFlow after all.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
from collections.abc import Iterable

log = logging.getLogger(__name__)

_FRAMEWORK = "tensorflow.core.framework."
_APIS = "tensorflow_serving.apis."
MODULES = (
    _FRAMEWORK + "tensor_pb2", _FRAMEWORK + "tensor_shape_pb2", _FRAMEWORK + "types_pb2",
    _APIS + "predict_pb2", _APIS + "get_model_metadata_pb2", _APIS + "get_model_status_pb2",
    _APIS + "model_management_pb2", _APIS + "prediction_service_pb2_grpc", _APIS + "model_service_pb2_grpc",
    "tensorflow_serving.config.model_server_config_pb2",
)


def _is_tensorflow(name: str) -> bool:
    return name == "tensorflow" or name.startswith("tensorflow.")


def _import_bare(names: Iterable[str]) -> list[types.ModuleType]:
    """Import ``names`` with a bare ``tensorflow`` package, then forget every ``tensorflow`` module loaded."""
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("tensorflow is not installed as a package")
    bare = types.ModuleType("tensorflow", "bare package: TensorFlow's folder without its __init__")
    bare.__path__ = list(spec.submodule_search_locations)
    bare.__spec__ = spec
    already = {name for name in sys.modules if _is_tensorflow(name)}
    sys.modules["tensorflow"] = bare
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        for name in [name for name in sys.modules if _is_tensorflow(name) and name not in already]:
            del sys.modules[name]


def load(names: Iterable[str] = MODULES) -> list[types.ModuleType]:
    """The modules ``names``, imported without TensorFlow's runtime unless it runs already."""
    names = list(names)
    if "tensorflow" not in sys.modules:
        try:
            return _import_bare(names)
        except Exception as error:  # noqa: BLE001 - any failure falls back to the ordinary import
            log.debug("loading TensorFlow's protocol modules alone failed (%s); importing TensorFlow", error)
    return [importlib.import_module(name) for name in names]


(tensor_pb2, tensor_shape_pb2, types_pb2,
 predict_pb2, get_model_metadata_pb2, get_model_status_pb2,
 model_management_pb2, prediction_service_pb2_grpc, model_service_pb2_grpc,
 model_server_config_pb2) = load()

"""The in-process limit: the same SavedModel signatures called directly in this process, no transport.

This is what the served figures are compared with: the best throughput this machine reaches over any
batch size, the latency of one photo at a time, and the ensemble's member computations run one after
another on the same TTA views.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carclf import contract
from carclf.errors import NotFound
from carclf.loadtest import checks, loadgen
from carclf.serving.repository import list_versions


def latest_version(repository: str | os.PathLike, model: str) -> Path:
    """The highest integer version folder of ``model`` in ``repository``."""
    base = Path(repository) / model
    versions = list_versions(base)
    if not versions:
        from carclf.loadtest.server import repository_models

        held = repository_models(repository)
        hint = (f"; {str(repository)!r} holds {', '.join(held)}: give --model NAME" if held
                else f"; {str(repository)!r} holds no exported model: export one (carclf export) or give "
                     f"--model-repository")
        raise NotFound(f"model {model!r} has no version under {str(base)!r}{hint}")
    return versions[max(versions)]


def input_spec(version_dir: str | os.PathLike) -> tuple[contract.Size, str]:
    """The model's input size and resize mode from its model card."""
    from carclf.ensemble.members import read_model_card

    card = read_model_card(version_dir)
    card_path = Path(version_dir) / "assets.extra" / contract.MODEL_CARD
    return contract.required_input_size(card, card_path), contract.card_resize(card)


@dataclass
class LoadedModel:
    """One SavedModel version loaded in this process, with its signatures and its labels."""

    name: str
    path: Path
    signatures: dict
    labels: list[str]
    size: contract.Size
    rss_delta_bytes: int
    resize: str = "squash"  # how photos become views of ``size`` (the model card's ``resize``)

    @classmethod
    def load(cls, repository: str | os.PathLike, name: str) -> LoadedModel:
        import psutil
        import tensorflow as tf

        path = latest_version(repository, name)
        rss0 = psutil.Process().memory_info().rss
        loaded = tf.saved_model.load(str(path))
        rss1 = psutil.Process().memory_info().rss
        labels = checks.read_labels(path / "assets" / contract.LABELS_ASSET)
        size, resize = input_spec(path)
        model = cls(name, path, dict(loaded.signatures), labels, size, rss1 - rss0, resize)
        model._keep = loaded  # the signatures need the loaded object alive
        return model

    def predict(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        fn = self.signatures[signature]
        tensors = {k: tf.constant(v, dtype=tf.string if v.dtype == object else None) for k, v in inputs.items()}
        return {k: v.numpy() for k, v in fn(**tensors).items()}


def batch_inputs(signature_input: str, photos: Sequence[np.ndarray], start: int, batch: int) -> dict[str, np.ndarray]:
    """Photos ``start .. start+batch`` (cycling) stacked as one batch of ``signature_input``."""
    picked = [photos[(start + i) % len(photos)] for i in range(batch)]
    return {signature_input: np.concatenate(picked, axis=0)}


def measure_batches(model: LoadedModel, signature: str, per_photo_inputs: Sequence[dict[str, np.ndarray]],
                    batch_sizes: Sequence[int], duration_s: float, warmup_s: float, threads: Sequence[int] = (1,),
                    max_calls: int = 100_000) -> list[dict]:
    """Throughput (photos/s), per-call latency and CPU per photo of the signature for each batch size and
    number of calling threads (closed loop, every answer checked)."""
    name = next(iter(per_photo_inputs[0]))
    arrays = [x[name] for x in per_photo_inputs]
    rows = []
    for thread_count in threads:
        for batch in batch_sizes:
            def factory(index: int, batch: int = batch):
                def send(i: int) -> loadgen.Check:
                    outputs = model.predict(signature, batch_inputs(name, arrays, (index * 7919 + i) * batch, batch))
                    return lambda: checks.check_prediction(outputs, model.labels, batch=batch)

                return send, lambda: None

            result = loadgen.closed_loop(factory, thread_count, duration_s, warmup_s, max_calls)
            photos = max(1, result.requests * batch)
            rows.append({"batch_size": batch, "threads": thread_count, **result.summary(items_per_request=batch),
                         "cpu_ms_per_photo": round(result.cpu_s * 1000 / photos, 3)})
    return rows


class EnsembleReference:
    """The ensemble's work done in this process, one member after another, no transport.

    Decoding and TTA views come from the ensemble runtime itself (``EnsembleRuntime.decode``/``views``:
    the same compiled graphs the server runs), then each member's ``serving_pixels`` signature is called
    in turn on all views stacked (``SavedModelMemberCaller``), views averaged, members aggregated as the
    config says. This is the yardstick the served ensemble's overhead is measured against.
    """

    def __init__(self, config, repository: str | os.PathLike):
        from carclf.ensemble.members import SavedModelMemberCaller
        from carclf.ensemble.runtime import EnsembleRuntime

        self.config = config
        self.caller = SavedModelMemberCaller(repository)
        self.runtime = EnsembleRuntime(config, self.caller)
        self.runtime.warm()
        specs = self.runtime.member_inputs()
        failed = {name: spec for name, spec in specs.items() if isinstance(spec, Exception)}
        if failed:
            raise next(iter(failed.values()))
        self.inputs = specs
        self.labels = list(self.runtime.labels)

    def predict(self, data: bytes) -> dict[str, np.ndarray]:
        from carclf.ensemble.aggregate import aggregate
        from carclf.tta import average_views

        views = self.runtime.views(self.runtime.decode([data]), list(self.inputs.values()))
        member_probs = []
        for member in self.config.members:
            reply = self.caller.call(member, views[self.inputs[member.name]], deadline=time.monotonic() + 60.0)
            member_probs.append(average_views(reply.probabilities, len(self.config.tta)))
        probs = aggregate(self.config.aggregation, np.stack(member_probs), self.config.weights)
        best = probs.argmax(axis=-1)
        return {contract.OUTPUT_PROBABILITIES: probs, contract.OUTPUT_CLASS_ID: best,
                contract.OUTPUT_LABEL: np.array([self.labels[i] for i in best], dtype=object)}

    def close(self) -> None:
        self.runtime.close()

    def measure(self, photos: Sequence[bytes], duration_s: float, warmup_s: float, max_calls: int = 100_000) -> dict:
        """One photo at a time (decode, views, every member in turn, aggregate), every answer checked."""

        def factory(_index: int):
            def send(i: int) -> loadgen.Check:
                outputs = self.predict(photos[i % len(photos)])
                return lambda: checks.check_prediction(outputs, self.labels)

            return send, lambda: None

        result = loadgen.closed_loop(factory, 1, duration_s, warmup_s, max_calls)
        return {**result.summary(), "cpu_ms_per_photo": round(result.cpu_s * 1000 / max(1, result.requests), 3)}

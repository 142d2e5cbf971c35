"""The one training loop: every backbone, every recipe, staged transfer learning with progressive resizing.

For each declared stage the classifier is (re)built at the stage's image size (weights carried over),
the stage's trainable flags are applied (BatchNormalization stays frozen, in inference mode), the
optimizer is compiled with the stage's learning rate, and Keras ``fit`` runs with checkpointing on the
monitored metric, early stopping, ReduceLROnPlateau, per-epoch exponential decay, timing, CSV and
TensorBoard logs. The best checkpoint of a stage starts the next one, or, for a stage that declares
``average_last``, the mean of its last epochs' weights with the head's BatchNorm statistics measured anew.
A run can be resumed from its last completed epoch.
"""

from __future__ import annotations

import functools
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from carclf import backbones
from carclf.errors import CarClfError, InvalidInput
from carclf.imaging import Size, side_pair, size_text
from carclf.train import data as data_mod
from carclf.train import evaluate, pipeline, runs
from carclf.train.augment import Augmenter
from carclf.train.model import (
    build_classifier,
    check_unfreeze,
    refresh_head_batchnorm,
    set_trainable,
    transfer_weights,
)
from carclf.train.plots import plot_curves
from carclf.train.recipe import LossConfig, OptimizerConfig, Recipe

if TYPE_CHECKING:
    from carclf.train.callbacks import Timing

log = logging.getLogger(__name__)


def make_optimizer(config: OptimizerConfig, lr: float):
    import keras

    if config.name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=config.momentum, nesterov=True)
    return keras.optimizers.Adam(learning_rate=lr, amsgrad=config.amsgrad)


def make_loss(config: LossConfig, num_classes: int, soft_targets: bool = False):
    """Sparse categorical cross-entropy; with label smoothing, the same on one-hot targets. With
    ``soft_targets`` (a mixing stage) the targets already are [B, num_classes] distributions."""
    import keras

    if soft_targets:
        return keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
    if not config.label_smoothing:
        return "sparse_categorical_crossentropy"
    smoothing = config.label_smoothing

    def smoothed_sparse_categorical_crossentropy(y_true, y_pred):
        ids = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        return keras.losses.categorical_crossentropy(keras.ops.one_hot(ids, num_classes), y_pred,
                                                     label_smoothing=smoothing)

    return smoothed_sparse_categorical_crossentropy


def build_training_state(model, num_classes: int, soft_targets: bool) -> None:
    """Create a compiled model's optimizer slots and metric variables now, before ``fit``.

    Without a distribution strategy Keras creates them inside the first traced training step, and
    TensorFlow traces a step that created variables a second time: a MobileNetV2 at 224 px took 37-38 s to
    its first batch, 17-20 s with this (docs/PERFORMANCE.md). The metrics are built from one placeholder
    prediction of the stage's target shape, then reset.
    """
    import numpy as np

    model.optimizer.build(model.trainable_variables)
    y_pred = np.full((1, num_classes), 1.0 / num_classes, dtype="float32")
    y_true = y_pred if soft_targets else np.zeros((1,), dtype="int32")
    model.compute_metrics(None, y_true, y_pred)
    model.reset_metrics()


@dataclass
class _State:
    """Where a run stands: the next stage, how many of its epochs are done, that stage's best score."""

    stage_index: int = 0
    stage_epochs_done: int = 0
    best: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def train(recipe: Recipe, runs_root: str | Path = "runs", run_dir: str | Path | None = None,
          verbose: int | None = None, time_budget_s: float | None = None) -> Path:
    """Train ``recipe`` into a new run folder and return it.

    With ``time_budget_s`` the run stops after the epoch in which the budget ran out (later stages are
    skipped) and is evaluated as it stands; run.json records that it was cut short (not finished), and
    ``resume`` continues it from that epoch.
    """
    recipe = runs.absolute_data_paths(recipe)  # the run's config must read the same data from any folder
    root_made = run_dir is None and not Path(runs_root).exists()  # (a bad transform was refused by validate())
    path = Path(run_dir) if run_dir else runs.new_run_dir(runs.run_name(recipe), runs_root)
    (path / runs.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    try:
        return _run(recipe, path, None, verbose, time_budget_s)
    except CarClfError:
        # Refused input (a bad photo list, a leak, unreadable weights) stops a run before its first epoch: a
        # folder made for it holds nothing to resume, so it goes. A later failure keeps it for --resume.
        if run_dir is None and not (path / runs.CHECKPOINTS / runs.LAST_WEIGHTS).exists():
            shutil.rmtree(path, ignore_errors=True)
            if root_made and not any(Path(runs_root).iterdir()):
                Path(runs_root).rmdir()
        raise


def resume(run_dir: str | Path, verbose: int | None = None, time_budget_s: float | None = None) -> Path:
    """Continue a run from its last completed epoch: that epoch's weights, and the optimizer's state (step,
    learning rate, moments) when the run stopped inside a stage."""
    path = Path(run_dir)
    recipe, raw = runs.resume_point(path)
    if "global_epoch" in raw:
        history = runs.trim_history(path, int(raw["global_epoch"]))
    else:
        history_file = path / runs.HISTORY_JSON
        history = runs.read_json(history_file) if history_file.is_file() else []
    state = _State(int(raw["stage_index"]), int(raw["stage_epochs_done"]), raw.get("best"), history)
    return _run(recipe, path, state, verbose, time_budget_s)


def _run(recipe: Recipe, run_dir: Path, state: _State | None, verbose: int | None,
         time_budget_s: float | None = None) -> Path:
    started = time.time()
    dataset = data_mod.read_dataset(recipe.data)  # before TensorFlow starts: data without classes is named at once
    import keras

    from carclf.train.callbacks import (
        LinearWarmup,
        TimeBudget,
        Timing,
        WeightAverage,
        restore_optimizer_state,
    )

    budget = TimeBudget(started + time_budget_s) if time_budget_s else None
    verbose = verbose if verbose is not None else (1 if sys.stdout.isatty() else 2)
    keras.utils.set_random_seed(recipe.seed)
    resuming = state is not None
    if not resuming:
        log.info("scanning %d files under %s", len(dataset.samples), dataset.root)
        report = data_mod.scan_dataset(dataset, recipe.data.min_side)
        runs.write_json(run_dir / runs.SCAN, report.to_dict())
        for bad in report.bad:
            log.warning("skipping %s: %s", bad["file"], bad["reason"])
        split = data_mod.stratified_split(data_mod.clean_samples(dataset, report), recipe.split.val_fraction,
                                          recipe.split.seed, folds=recipe.split.folds, fold=recipe.split.fold)
        if recipe.data.extra_train:
            split.extra, skipped = data_mod.extra_training_samples(recipe.data.extra_train, dataset, split,
                                                                   recipe.data.min_side)
            for bad in skipped:
                log.warning("skipping %s: %s", bad["file"], bad["reason"])
        if not split.training:  # a refusal before the first epoch: train() removes the folder made for the run
            raise InvalidInput(_no_training_photos(dataset, report, split))
        data_mod.save_split(split, run_dir / runs.SPLIT)
        runs.save_config(run_dir, recipe)
        (run_dir / runs.LABELS).write_text("\n".join(dataset.class_names) + "\n", encoding="utf-8")
        runs.write_json(run_dir / runs.CLASSES, dict(zip(dataset.class_ids, dataset.class_names, strict=True)))
        state = _State()
    else:
        split = data_mod.load_split(run_dir / runs.SPLIT, dataset)
    log.info("run %s: %d training / %d validation photos (split %s), %d classes", run_dir, len(split.train),
             len(split.val), split.fingerprint(), dataset.num_classes)
    if split.extra:
        log.info("training also on %d photos of data.extra_train", len(split.extra))
    if not split.val:
        why = (f"split.val_fraction {split.val_fraction:g}" if not split.val_fraction else
               f"no class has 2 usable photos to hold one out at split.val_fraction {split.val_fraction:g}")
        log.warning("no validation photos (%s): checkpoints, early stopping and learning-rate cuts follow the "
                    "training %s, and the run reports no accuracy", why, recipe.schedule.monitor.removeprefix("val_"))

    spec = backbones.get(recipe.backbone)
    model = None
    weights_used = recipe.weights
    info_path = run_dir / runs.RUN_INFO
    if resuming and info_path.is_file():
        weights_used = runs.read_json(info_path).get("weights_used")
    prepared: dict[tuple[str, Any], Any] = {}
    final_size = recipe.final_size
    train_seconds = 0.0
    averaged: dict[str, list[int]] = {}
    cut_short = False  # by the time budget: stages or epochs left for --resume
    plotted: int | None = None  # epochs in the curves last drawn
    epoch_offset = sum(s.epochs for s in recipe.stages[: state.stage_index])

    for index, stage in enumerate(recipe.stages):
        if index < state.stage_index:
            continue
        if budget is not None and budget.expired:
            log.warning("time budget of %.0f s spent: skipping stage %r", time_budget_s, stage.name)
            cut_short = True
            continue
        size = stage.image_size
        if model is None:
            if resuming:
                model, _ = build_classifier(spec, dataset.num_classes, recipe.head, size, None,
                                            freeze_batchnorm=weights_used is not None)
                runs.load_weights(model, run_dir / runs.CHECKPOINTS / runs.LAST_WEIGHTS)
            else:
                model, weights_used = build_classifier(spec, dataset.num_classes, recipe.head, size, recipe.weights,
                                                       recipe.on_missing_weights,
                                                       freeze_batchnorm=recipe.weights is not None)
                if weights_used is None and recipe.weights is not None:  # fell back to scratch: BN must learn
                    model, _ = build_classifier(spec, dataset.num_classes, recipe.head, size, None,
                                                freeze_batchnorm=False)
                check_unfreeze(model, spec, recipe.stages, recipe.source)
        elif tuple(model.input_shape[1:3]) != side_pair(size):
            resized, _ = build_classifier(spec, dataset.num_classes, recipe.head, size, None,
                                          freeze_batchnorm=weights_used is not None)
            transfer_weights(model, resized)
            model = resized
        _write_run_info(run_dir, recipe, dataset, split, weights_used, size, started, finished=False)
        final_size = size
        counts = set_trainable(model, spec, stage.unfreeze, freeze_batchnorm=weights_used is not None)
        soft = stage.mix is not None
        # Mixed targets are distributions, so the stage scores argmax(target) == argmax(prediction).
        accuracy = keras.metrics.CategoricalAccuracy(name="accuracy") if soft else "accuracy"
        model.compile(optimizer=make_optimizer(recipe.optimizer, stage.lr),
                      loss=make_loss(recipe.loss, dataset.num_classes, soft), metrics=[accuracy])
        build_training_state(model, dataset.num_classes, soft)
        if index == state.stage_index and state.stage_epochs_done:
            restored = restore_optimizer_state(model.optimizer, model.trainable_variables,
                                               run_dir / runs.CHECKPOINTS / runs.OPTIMIZER_STATE)
            log.info("resuming stage %r after epoch %d (optimizer state %s)", stage.name, state.stage_epochs_done,
                     "restored" if restored else "fresh")
        log.info("stage %d/%d %r: %d epochs at %s px, batch %d, lr %g, unfreeze %s (%d trainable / %d frozen "
                 "backbone layers with weights)", index + 1, len(recipe.stages), stage.name, stage.epochs,
                 size_text(size), stage.batch_size, stage.lr, stage.unfreeze, counts["trainable_layers"],
                 counts["frozen_layers"])

        for part, samples in (("train", split.training), ("val", split.val)):
            if samples and (part, size) not in prepared:
                prepared[(part, size)] = pipeline.prepared_images(samples, size, recipe.resize,
                                                                  channel_order=recipe.data.channel_order)
        augmenter = Augmenter(recipe.augmentation, size, seed=recipe.seed + index, source=recipe.source)
        (run_dir / "augmentation").mkdir(exist_ok=True)
        augmenter.save(run_dir / "augmentation" / f"{stage.name}.json")
        augmenter.save(run_dir / runs.AUGMENTATION)  # the last stage's pipeline is the model's
        training_stream = functools.partial(pipeline.training_stream, prepared[("train", size)], len(split.training),
                                            stage.batch_size, augmenter, seed=recipe.seed * 1000 + index,
                                            num_classes=dataset.num_classes)
        stream = training_stream(mix=stage.mix)
        val = (pipeline.evaluation_batches(prepared[("val", size)], stage.batch_size,
                                           dataset.num_classes if soft else 0) if split.val else None)

        done = state.stage_epochs_done if index == state.stage_index else 0
        best = state.best if index == state.stage_index and done else None
        timing = Timing(len(split.training))
        steps = pipeline.steps_per_epoch(len(split.training), stage.batch_size)
        averager = WeightAverage(stage.average_last) if stage.average_last else None
        warmup = (LinearWarmup(stage.lr, round(stage.warmup_epochs * steps), done * steps)
                  if stage.warmup_epochs else None)
        # The warm-up sets the rate before any batch; the others act at epoch ends.
        callbacks = ([warmup] if warmup else []) + _callbacks(
            recipe, run_dir, stage.name, index, epoch_offset, state.history, best, timing,
            has_val=bool(split.val)) + ([budget] if budget else []) + ([averager] if averager else [])
        ran = 0
        if done < stage.epochs:
            fitted = model.fit(stream, steps_per_epoch=steps, epochs=epoch_offset + stage.epochs,
                               initial_epoch=epoch_offset + done, validation_data=val, callbacks=callbacks,
                               verbose=verbose, shuffle=False)
            ran = len(fitted.epoch)
        train_seconds += timing.total
        early_stopped = any(isinstance(c, keras.callbacks.EarlyStopping) and c.stopped_epoch for c in callbacks)
        # Cut inside the stage by the budget: ResumeState's checkpoint of the last epoch (weights, optimizer,
        # epochs done) stays what --resume continues from; the weights below only serve this run's evaluation.
        cut = budget is not None and budget.expired and done + ran < stage.epochs and not early_stopped
        best_file = runs.best_weights(run_dir, stage.name)
        if averager is not None and averager.count:
            if averager.count < stage.average_last:
                log.warning("stage %r: averaging %d epochs, not %d (stopped early or resumed inside the window)",
                            stage.name, averager.count, stage.average_last)
            model.set_weights(averager.average())
            # Measured on the photos themselves, not on mixes of them.
            seen = refresh_head_batchnorm(model, training_stream(mix=None) if soft else stream, steps)
            averaged[stage.name] = averager.epochs
            log.info("stage %r ends on the mean weights of epochs %s (head BatchNorm measured on %d training "
                     "images)", stage.name, averager.epochs, seen)
        elif best_file.is_file():
            runs.load_weights(model, best_file)
        if cut:
            log.warning("time budget of %.0f s spent after epoch %d of %d of stage %r: stopping here (continue "
                        "with carclf train --resume %s)", time_budget_s, done + ran, stage.epochs, stage.name, run_dir)
            cut_short = True
            break
        runs.save_weights(model, run_dir / runs.CHECKPOINTS / runs.LAST_WEIGHTS)
        runs.write_json(run_dir / runs.CHECKPOINTS / runs.STATE,
                        {"stage_index": index + 1, "stage_epochs_done": 0, "best": None,
                         "global_epoch": int(state.history[-1]["epoch"]) if state.history else 0})
        epoch_offset += stage.epochs
        plot_curves(state.history, run_dir / runs.CURVES)
        plotted = len(state.history)

    if model is None:  # resumed a run whose stages were all done
        model, _ = build_classifier(spec, dataset.num_classes, recipe.head, final_size, None)
        runs.load_weights(model, run_dir / runs.CHECKPOINTS / runs.LAST_WEIGHTS)
    runs.save_weights(model, run_dir / runs.FINAL_WEIGHTS)
    if plotted != len(state.history):  # a stage cut by the budget, or a resumed run with nothing left to train
        plot_curves(state.history, run_dir / runs.CURVES)
    runs.write_json(run_dir / runs.HISTORY_JSON, state.history)

    results: dict[str, Any] = {}
    if split.val:
        results = evaluate.evaluate_photos(evaluate.keras_predictor(model), [s.path for s in split.val],
                                           [s.label for s in split.val], final_size, recipe.tta,
                                           dataset.class_ids, dataset.class_names, resize=recipe.resize,
                                           channel_order=recipe.data.channel_order)
        log.info("validation accuracy: %s", evaluate.summary_line(results))
    info = _write_run_info(run_dir, recipe, dataset, split, weights_used, final_size, started,
                           finished=not cut_short, train_seconds=train_seconds, averaged_epochs=averaged)
    if cut_short:
        info["cut_short_by_time_budget_s"] = time_budget_s
        runs.write_json(run_dir / runs.RUN_INFO, info)
    evaluate.write_results(results, run_dir, dataset.class_ids, prefix="metrics",
                           extra={"run": str(run_dir), "split": "val", **info})
    return run_dir


def _no_training_photos(dataset: data_mod.Dataset, report: data_mod.ScanReport, split: data_mod.Split) -> str:
    """Why a new run has no photo to train on: every file skipped, no file at all, or all held out."""
    where = f"no usable training photos in {dataset.root!r}"
    if not dataset.samples:
        return f"{where}: it holds no photo files"
    if not report.good:
        first = report.bad[0]
        return (f"{where}: all {len(report.bad)} files were skipped (the warnings above name each; the first, "
                f"{first['file']}: {first['reason']})")
    return (f"no training photos in {dataset.root!r}: split.val_fraction {split.val_fraction:g} holds out all "
            f"{len(split.val)} usable photos (each class has one); lower it or add photos")


def _callbacks(recipe: Recipe, run_dir: Path, stage_name: str, index: int, epoch_offset: int,
               history: list[dict[str, Any]], best: float | None, timing: Timing, has_val: bool) -> list:
    import keras

    from carclf.train.callbacks import ExponentialDecay, ResumeState

    sched = recipe.schedule
    monitor = sched.monitor if has_val else sched.monitor.removeprefix("val_")
    mode = "max" if "acc" in monitor else "min"
    checkpoint_kwargs = {"initial_value_threshold": best} if best is not None else {}
    best_file = runs.best_weights(run_dir, stage_name)
    return [
        timing,
        ExponentialDecay(sched.decay_per_epoch, sched.min_lr),
        keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=mode, factor=sched.plateau_factor,
                                          patience=sched.plateau_patience, min_lr=sched.min_lr, verbose=1),
        keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=sched.early_stopping_patience,
                                      verbose=1),
        keras.callbacks.ModelCheckpoint(str(runs.partial_path(best_file)),
                                        monitor=monitor, mode=mode, save_best_only=True, save_weights_only=True,
                                        verbose=0, **checkpoint_kwargs),
        keras.callbacks.CSVLogger(str(run_dir / runs.HISTORY_CSV), append=True),
        keras.callbacks.TensorBoard(log_dir=str(run_dir / runs.TENSORBOARD), write_graph=False,
                                    update_freq="epoch"),
        ResumeState(run_dir, index, epoch_offset, monitor, history, stage_name, best, best_file),
    ]


def _write_run_info(run_dir: Path, recipe: Recipe, dataset, split, weights_used: str | None, image_size: Size,
                    started: float, finished: bool, train_seconds: float | None = None,
                    averaged_epochs: dict[str, list[int]] | None = None) -> dict[str, Any]:
    info = {
        "recipe": recipe.name,
        "backbone": recipe.backbone,
        "weights_requested": recipe.weights,
        "weights_used": weights_used,
        "batchnorm_frozen": weights_used is not None,
        "image_size": image_size,
        "class_ids": dataset.class_ids,
        "class_names": dataset.class_names,
        "data_root": dataset.root,
        "data_channel_order": recipe.data.channel_order,
        "num_train": len(split.train),
        "num_val": len(split.val),
        "num_extra_train": len(split.extra),
        "split_seed": split.seed,
        "val_fraction": split.val_fraction,
        "folds": split.folds,
        "fold": split.fold,
        "val_fingerprint": split.fingerprint(),
        "epochs_planned": sum(s.epochs for s in recipe.stages),
        "finished": finished,
        "train_seconds": round(train_seconds, 1) if train_seconds is not None else None,
        "wall_seconds": round(time.time() - started, 1),
        "averaged_epochs": averaged_epochs or {},  # stage -> the epochs whose mean weights ended it
    }
    runs.write_json(run_dir / runs.RUN_INFO, info)
    return info

"""``carclf train RECIPE``: train a recipe (packaged name or YAML file) into runs/<recipe>-<timestamp>/."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from pathlib import Path

from carclf import sources
from carclf.destinations import check_folder
from carclf.errors import InvalidInput
from carclf.train import data
from carclf.train.commands import add_channel_order_argument, channel_order_for, setup_logging
from carclf.train.recipe import ExtraSource, Recipe, load_recipe, recipe_names

log = logging.getLogger(__name__)

# options that change the recipe, so a resumed run (which keeps its saved config) refuses them
_RECIPE_OVERRIDES = ("data", "classes", "channel_order", "extra_train", "weights", "allow_scratch", "seed",
                     "split_seed", "val_fraction", "folds", "fold", "name")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help=f"recipe name ({', '.join(recipe_names(experiments=False))}, or one "
                                                   "of train/recipes/experiments/) or a YAML file")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last epoch")
    parser.add_argument("--data", help="training folder of class folders (overrides the recipe's data.train; its "
                                       "class names come from the classes.json beside it, else its folder names)")
    parser.add_argument("--classes", help="class-names file (overrides data.classes, and the one beside --data)")
    add_channel_order_argument(parser, default=None, extra_help=" (overrides data.channel_order; a folder given "
                                                                "with --data is read as rgb unless told)")
    parser.add_argument("--extra-train", nargs=2, action="append", metavar=("CSV", "IMAGES"),
                        help="photos that only train (a CSV Id,Category and its image folder, e.g. from "
                             "'carclf pseudo-label'; {fold} in CSV stands for the fold); repeatable, replaces "
                             "data.extra_train")
    parser.add_argument("--weights", help="'imagenet', 'none' or a weights file (overrides the recipe; weights that "
                                          "cannot be had stop the run unless --allow-scratch)")
    parser.add_argument("--allow-scratch", action="store_true",
                        help="if the weights cannot be had, train from scratch with a warning")
    parser.add_argument("--seed", type=int, help="training seed (augmentation, shuffling, initialisation)")
    parser.add_argument("--split-seed", type=int, help="seed of the train/validation split")
    parser.add_argument("--val-fraction", type=float, help="fraction of each class held out for validation")
    parser.add_argument("--folds", type=int, metavar="K",
                        help="stratified K-fold split instead of a hold-out; without --fold, train every fold in "
                             "turn and write the pooled cross-validation summary")
    parser.add_argument("--fold", type=int, metavar="I", help="train only fold I (0..K-1) of the --folds split")
    parser.add_argument("--name", help="recipe name used for the run folder")
    parser.add_argument("--runs", default="runs", help="folder that holds the run folders (default: runs)")
    parser.add_argument("--time-budget", type=float, metavar="MINUTES",
                        help="stop after the epoch in which this many minutes have passed, then evaluate; "
                             "--resume continues the run from that epoch (with --folds, each fold has this budget)")
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2), help="Keras progress output")


def recipe_from(args: argparse.Namespace) -> Recipe:
    """The named recipe with the command line's overrides. A folder named by ``--data`` brings its own class
    names, as it brings its own channel order: the ``classes.json`` beside it (the Kaggle layout's) or inside it,
    else its class folders' names; the recipe's ``data.classes`` names another data set's classes (``--classes``
    overrides both)."""
    channel_order = channel_order_for(args.channel_order, bool(args.data), None)  # None: keep the recipe's
    classes = args.classes or (data.classes_beside(args.data) if args.data else None)
    recipe = load_recipe(args.recipe).with_overrides(
        train=args.data, classes=classes, channel_order=channel_order, extra_train=_extra_sources(args.extra_train),
        weights=args.weights, seed=args.seed, name=args.name, split_seed=args.split_seed,
        val_fraction=args.val_fraction, folds=args.folds, fold=args.fold,
        # Weights named on the command line are the ones wanted: they fall back to scratch only when told.
        on_missing_weights="scratch" if args.allow_scratch else ("fail" if args.weights else None))
    if args.data and not args.classes:
        log.info("class names of --data: %s", classes or "its class folders' names (no classes.json beside it; "
                                                          "--classes FILE names them)")
        if not classes and recipe.data.classes:
            recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, classes=None))
    return recipe


def run(args: argparse.Namespace) -> int:
    setup_logging()
    if args.resume:
        if args.recipe:
            raise InvalidInput("give either a RECIPE or --resume RUN_DIR, not both")
        changed = [f"--{name.replace('_', '-')}" for name in _RECIPE_OVERRIDES
                   if getattr(args, name) not in (None, False)]
        if changed:
            raise InvalidInput(f"--resume continues {args.resume!r} with the config saved in it; "
                               f"{', '.join(changed)} cannot change it (start a new run instead)")
        from carclf.train import loop

        path = loop.resume(args.resume, verbose=args.verbose, time_budget_s=_budget(args))
    else:
        if not args.recipe:
            raise InvalidInput(f"name a recipe ({', '.join(recipe_names(experiments=False))}, or one of "
                               "train/recipes/experiments/) or a YAML file, or --resume RUN_DIR")
        if args.data and (why := sources.why_not(args.data, "folder")):
            raise InvalidInput(f"--data {args.data!r} {why}")
        recipe = recipe_from(args)
        if args.folds is not None and args.val_fraction is not None:
            raise InvalidInput(f"--val-fraction {args.val_fraction} does not apply with --folds {args.folds}: each "
                               "fold validates on its 1/K of the photos")
        check_folder(args.runs, "--runs")
        if args.folds is not None and args.fold is None and recipe.split.folds:
            return _cross_validate(recipe, args)
        from carclf.train import loop

        path = loop.train(recipe, runs_root=args.runs, verbose=args.verbose, time_budget_s=_budget(args))
    print(f"run folder: {path}")
    return 0


def _cross_validate(recipe: Recipe, args: argparse.Namespace) -> int:
    """Train fold 0..K-1 in turn, then pool them (``carclf.train.crossval``) into one summary file."""
    import time

    from carclf.train import crossval, loop
    from carclf.train.runs import write_json

    paths = []
    for fold in range(recipe.split.folds):
        one = recipe.with_overrides(fold=fold)
        paths.append(loop.train(one, runs_root=args.runs, verbose=args.verbose, time_budget_s=_budget(args)))
        print(f"fold {fold}: run folder {paths[-1]}", flush=True)
    summary = crossval.summarize(paths)
    out = Path(args.runs) / f"{recipe.name}-crossval{recipe.split.folds}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(out, summary)
    print(crossval.format_summary(summary))
    print(f"cross-validation summary: {out}")
    return 0


def _extra_sources(pairs: list[list[str]] | None) -> tuple[ExtraSource, ...] | None:
    return tuple(ExtraSource(csv=csv, images=images) for csv, images in pairs) if pairs else None


def _budget(args: argparse.Namespace) -> float | None:
    if args.time_budget is None:
        return None
    if not math.isfinite(args.time_budget) or args.time_budget <= 0:
        raise InvalidInput(f"--time-budget must be a positive, finite number of minutes, received {args.time_budget}")
    return args.time_budget * 60.0

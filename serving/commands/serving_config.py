"""``carclf serving-config``: write models.config (a ModelServerConfig text proto) from a model repository.

Every folder of the repository holding integer versions becomes one model. With two or more versions
the two newest are served with ``specific`` and labelled ``stable`` (older) and ``canary`` (newest);
with one version it is served with ``latest`` and both labels point at it. ``--base_path_prefix``
writes base paths for another machine (``/models`` for the docker-compose and Kubernetes files);
by default they are the repository's absolute local paths (what the embedded server reads).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path, PurePosixPath

from carclf.destinations import STDOUT, check_file, write_or_print
from carclf.errors import ConfigError
from carclf.serving.config import MODEL_NAME_RE, VersionPolicy, models_config_to_text
from carclf.serving.repository import SAVED_MODEL_FILES, holds_savedmodel, list_models, model_versions

HEADER = ("# ModelServerConfig for TensorFlow Serving (--model_config_file), written by `carclf serving-config`.\n"
          "# Labels: stable = the version users get, canary = the newest export under trial.\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", default="model_repository", help="model repository (<name>/<version>/)")
    parser.add_argument("--output", "--out", default="-", help="file to write ('-': standard output)")
    parser.add_argument("--base_path_prefix", default="",
                        help="prefix of every base_path, e.g. /models for the container (default: the "
                             "repository's absolute path)")
    parser.add_argument("--models", nargs="*", default=None, help="only these models (default: every model)")
    parser.add_argument("--policy", choices=("labelled", "latest", "all"), default="labelled",
                        help="labelled: two newest versions with stable/canary labels; latest: newest only; "
                             "all: every version")


def build_entries(repository: Path, *, prefix: str = "", only: list[str] | None = None, policy: str = "labelled"):
    """(name, base_path, VersionPolicy, labels) per model of the repository."""
    if not repository.is_dir():
        raise ConfigError(f"{str(repository)!r} is not a folder (a model repository holds <name>/<version>/)",
                          source="--repository")
    models = {}
    for name, versions in list_models(repository).items():  # version folders that hold a SavedModel
        complete = {v: path for v, path in versions.items() if holds_savedmodel(path)}
        left_out = sorted(set(versions) - set(complete))
        if left_out:
            print(f"carclf serving-config: note: {name}: leaving out version folder(s) {left_out} without "
                  f"{' or '.join(SAVED_MODEL_FILES)}", file=sys.stderr)
        if complete:
            models[name] = complete
    if only:
        missing = sorted(set(only) - set(models))
        if missing:
            raise ConfigError(f"no versions found for {', '.join(missing)} under {repository}", source="--models")
        models = {name: models[name] for name in only}
    if not models:
        hint = ""
        if inside := model_versions(repository):
            hint = (f" ({repository} is itself a model: its folders {inside} are versions; give the repository "
                    f"that holds it, here {repository.absolute().parent})")
        raise ConfigError(f"no model with integer version folders under {repository.absolute()}{hint}",
                          source="--repository")
    entries = []
    for name, versions in sorted(models.items()):
        if not MODEL_NAME_RE.match(name):
            raise ConfigError(f"folder name {name!r} is not a valid model name", source=str(repository))
        base = str(PurePosixPath(prefix) / name) if prefix else str((repository / name).absolute())
        found = sorted(versions)
        if policy == "all":
            entries.append((name, base, VersionPolicy("all"), {}))
        elif policy == "latest" or len(found) == 1:
            labels = {"stable": found[-1], "canary": found[-1]} if policy == "labelled" else {}
            entries.append((name, base, VersionPolicy("latest", num_versions=1), labels))
        else:
            stable, canary = found[-2], found[-1]
            entries.append((name, base, VersionPolicy("specific", versions=(stable, canary)),
                            {"stable": stable, "canary": canary}))
    return entries


def run(args: argparse.Namespace) -> int:
    if args.base_path_prefix and not args.base_path_prefix.startswith("/"):
        raise ConfigError(f"received {args.base_path_prefix!r}; TF Serving needs absolute base paths",
                          source="--base_path_prefix")
    if args.output != STDOUT:
        check_file(args.output, "--output")
    entries = build_entries(Path(args.repository), prefix=args.base_path_prefix, only=args.models,
                            policy=args.policy)
    write_or_print(args.output, HEADER + models_config_to_text(entries), ", ".join(e[0] for e in entries))
    return 0

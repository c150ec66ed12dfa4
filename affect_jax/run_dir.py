"""A run's directory: the names of its files, writing its records and loading a run back.

Files of a run directory (``--workdir``):

- ``config.json``: the configuration the run was started (or last resumed) with.
- ``run.log``: every log line of every run and evaluation in this directory (the console shows
  fewer; ``console``).
- ``metrics.jsonl``: one JSON record per completed epoch (see ``report`` for its fields).
  Every JSON file here is strict JSON: an undefined number (e.g. the precision of a class that
  was never predicted) is ``null``.
- ``final_metrics.json``: the best checkpoint's validation scores (``evaluation.result_record``).
- ``eval_<split>_<checkpoint>[_flip].json``: ``main --mode=eval`` scores.
- ``data_report.json``: what the data reader kept and dropped.
- ``class_balance.json``: the training split's class counts, class weights and sampling
  (``imbalance``).
- ``report.md``, ``training_curves.png``, ``confusion_matrix.png``: ``report.write_reports``.
- ``checkpoints/<epoch>``: Orbax checkpoints of the train state (``checkpointing``).
- ``checkpoint_mid_epoch/<step>``: where a run stopped by a signal mid-epoch stopped (one at most;
  removed once that epoch's own checkpoint is saved).
- ``checkpoints_damaged/``: checkpoints that could not be restored, set aside (not deleted).
- ``run.lock``: held by the command writing into the run (``run_lock``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from affect_jax import checkpointing, imbalance, run_lock, sharding, steps, strict_json
from affect_jax.data import source as data_source
from affect_jax.data.source import AFFECTNET_CLASS_NAMES
from affect_jax.errors import UserError

CONFIG = "config.json"
RUN_LOG = "run.log"
METRICS_HISTORY = "metrics.jsonl"
FINAL_METRICS = "final_metrics.json"
DATA_REPORT = data_source.REPORT_FILE
CLASS_BALANCE = imbalance.CLASS_BALANCE_FILE
REPORT = "report.md"
TRAINING_CURVES = "training_curves.png"
CONFUSION_MATRIX = "confusion_matrix.png"
CHECKPOINTS = "checkpoints"
MID_EPOCH_CHECKPOINT = "checkpoint_mid_epoch"
DAMAGED_CHECKPOINTS = "checkpoints_damaged"
LOCK = run_lock.LOCK_FILE
CHECKPOINT_CHOICES = ("best", "latest")


def eval_result_name(split: str, checkpoint: str, flip_tta: bool) -> str:
    """The file ``main --mode=eval`` writes its scores to."""
    return f"eval_{split}_{checkpoint}{'_flip' if flip_tta else ''}.json"


def checkpoints_dir(workdir: str | os.PathLike) -> str:
    """The absolute path of the run's checkpoint directory (Orbax wants one)."""
    return os.path.abspath(os.path.join(workdir, CHECKPOINTS))


def mid_epoch_checkpoint_dir(workdir: str | os.PathLike) -> str:
    return os.path.abspath(os.path.join(workdir, MID_EPOCH_CHECKPOINT))


def damaged_checkpoints_dir(workdir: str | os.PathLike) -> str:
    return os.path.abspath(os.path.join(workdir, DAMAGED_CHECKPOINTS))


def saved_epochs(workdir: str | os.PathLike) -> int:
    """The newest epoch checkpoint's number on disk (0 if none): a quick look that does not
    check it restores (``checkpointing.restore_latest`` does)."""
    directory = checkpoints_dir(workdir)
    if not os.path.isdir(directory):
        return 0
    return max((int(name) for name in os.listdir(directory) if name.isdigit()), default=0)


def has_checkpoints(workdir: str | os.PathLike) -> bool:
    """Whether the run has saved a train state (an epoch's or a mid-epoch checkpoint)."""
    return any(
        os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))
        for d in (checkpoints_dir(workdir), mid_epoch_checkpoint_dir(workdir))
    )


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


json_safe = strict_json.json_safe  # NaN and infinities -> None (JSON null)


def write_json(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Writes ``record`` as strict JSON (undefined numbers as null)."""
    strict_json.write(path, record)


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Appends one strict JSON line and syncs it: a kill right after leaves the line complete."""
    line = strict_json.dumps(record) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def truncate_history(workdir: str, completed_epochs: int) -> None:
    """Drops lines of epochs that were not checkpointed (a run killed in between)."""
    path = os.path.join(workdir, METRICS_HISTORY)
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line)["epoch"] <= completed_epochs]
    if len(kept) != len(lines):
        with open(path, "w") as f:
            f.writelines(kept)


# Config fields a run may be resumed (or scored) with changed, and why: none of them changes the
# saved train state or the data split, so the checkpoints still fit and the run continues as it
# would have. Every other field differing is refused (``check_config``).
CHANGEABLE_FIELDS = {
    "num_epochs": "how long to train: raised, the run trains on from its last epoch",
    "log_every_steps": "console output only",
    "eval_batch_size": "how validation is batched; the same scores (float32 round-off apart)",
    "steps_per_execution": "how many steps one call runs; the same training (float32 round-off "
    "apart with XLA's kernels)",
    "conv_impl": "which kernels compute; the same results up to float32 round-off",
    "batch_norm_impl": "which kernels compute; the same results up to float32 round-off",
    "pool_impl": "which kernels compute; the same results up to float32 round-off",
    "compilation_cache_dir": "where compiled programs are cached",
    "keep_checkpoints": "how many older epochs' checkpoints are kept",
    "model.weights": "the ImageNet weights are read only when a run starts",
    "data.dir": "where the data is (moved, or mounted elsewhere): the same files, the same split",
    "data.tfds_data_dir": "where TFDS keeps its prepared copy",
    "data.image_root": "where a manifest's relative image paths start (moved data)",
}


class IncompatibleConfigError(UserError, ValueError):
    """A run resumed (or scored) with a config its checkpoints or data split do not fit."""


def flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(
    saved: dict[str, Any], config: ml_collections.ConfigDict
) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, new value)}`` of every field that differs (JSON values;
    ``<unset>`` for a field only one of them has)."""
    old = flatten_config(saved)
    new = flatten_config(json.loads(config.to_json_best_effort()))
    unset = "<unset>"
    return {
        k: (old.get(k, unset), new.get(k, unset))
        for k in sorted(old.keys() | new.keys())
        if old.get(k, unset) != new.get(k, unset)
    }


def _listing(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} ({json.dumps(a)} -> {json.dumps(b)})" for k, (a, b) in changes.items())


def check_config(config: ml_collections.ConfigDict, workdir: str, action: str = "resume") -> None:
    """Refuses, in one line, a config whose fields outside ``CHANGEABLE_FIELDS`` differ from
    the run's ``config.json``; logs the changes it accepts. No ``config.json``: nothing to do.

    ``action``: 'resume' (training) or 'score' (``--mode=eval``), for the message.
    """
    path = os.path.join(workdir, CONFIG)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        changes = config_changes(json.load(f), config)
    refused = {k: v for k, v in changes.items() if k not in CHANGEABLE_FIELDS}
    if refused:
        todo = (
            f"start a new run with another --workdir, or resume with the values of {path}"
            if action == "resume"
            else f"score it with the values of {path}"
        )
        raise IncompatibleConfigError(
            f"cannot {action} {workdir} with this config: {_listing(refused)} "
            f"{'differs' if len(refused) == 1 else 'differ'} from the run's config and would "
            f"not fit its checkpoints or data split; {todo}"
        )
    if changes:
        logging.info(
            "%s %s with changed %s (%s)",
            action.capitalize(),
            workdir,
            _listing(changes),
            "; ".join(CHANGEABLE_FIELDS[k] for k in changes),
        )


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes ``config.json`` (a resumed run's is checked first: ``check_config``)."""
    path = os.path.join(workdir, CONFIG)
    with open(path, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's configuration, read from ``workdir/config.json``."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"run directory {workdir!r} does not exist")
    path = os.path.join(workdir, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {workdir!r} is not a run directory written by "
            "`python -m affect_jax.main --workdir=...`"
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def class_names(workdir: str, config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The class names of ``final_metrics.json``; AffectNet's order if the run is unfinished."""
    num_classes = int(config.data.num_classes)
    path = os.path.join(workdir, FINAL_METRICS)
    if os.path.isfile(path):
        with open(path) as f:
            names = json.load(f).get("class_names") or []
        if len(names) == num_classes:
            return tuple(str(n) for n in names)
    # Every source orders its classes as AffectNet does (synthetic, all AffectNet layouts).
    names = AFFECTNET_CLASS_NAMES[:num_classes]
    return tuple(names) + tuple(f"class_{k}" for k in range(len(names), num_classes))


def load_final_metrics(workdir: str | Path) -> dict[str, Any]:
    """Reads ``final_metrics.json``; FileNotFoundError names the workdir if it is missing."""
    path = Path(workdir) / FINAL_METRICS
    if not path.is_file():
        raise FileNotFoundError(f"{workdir}: no {FINAL_METRICS} (has the run finished?)")
    return json.loads(path.read_text())


def load_history(workdir: str | Path) -> list[dict[str, Any]]:
    """Reads ``metrics.jsonl`` sorted by epoch ([] if absent).

    A resumed run may log an epoch twice; the last record of an epoch wins.
    """
    path = Path(workdir) / METRICS_HISTORY
    if not path.is_file():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            # A run killed mid-write leaves a truncated last line; say where, do not guess.
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
        by_epoch[int(record["epoch"])] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def checkpoint_manager(
    workdir: str, config: ml_collections.ConfigDict, read_only: bool = False
) -> ocp.CheckpointManager:
    """The run's checkpoint manager (``checkpointing.create_manager``), ranked as training
    ranks; ``read_only`` neither creates nor deletes anything (safe beside a training run)."""
    return checkpointing.create_manager(checkpoints_dir(workdir), config, read_only=read_only)


def _no_checkpoints(workdir: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"no checkpoints in {checkpoints_dir(workdir)}: train first with "
        f"`python -m affect_jax.main --mode=train --workdir={workdir} ...`"
    )


def open_checkpoints(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """A read-only manager of a run with at least one checkpoint."""
    if not os.path.isdir(checkpoints_dir(workdir)):
        raise _no_checkpoints(workdir)
    manager = checkpoint_manager(workdir, config, read_only=True)
    if not manager.all_steps():
        manager.close()
        raise _no_checkpoints(workdir)
    return manager


def choose_checkpoint(
    manager: ocp.CheckpointManager, which: str = "best", step: int | None = None
) -> int:
    """The step (epoch) ``step`` if given, else the ``best`` or ``latest`` one.

    ``best`` falls back to the latest (with a warning) when no validation metrics were saved.
    """
    if which not in CHECKPOINT_CHOICES:
        raise ValueError(f"which={which!r}; expected one of {CHECKPOINT_CHOICES}")
    available = sorted(manager.all_steps())
    if step is not None:
        if step not in available:
            raise FileNotFoundError(
                f"no checkpoint {step} in {manager.directory}; available: {available}"
            )
        return step
    if which == "best":
        best = manager.best_step()
        if best is not None:
            return best
        logging.warning("No validation metrics saved with the checkpoints; using the latest.")
    return manager.latest_step()


def restore_checkpoint(
    workdir: str,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    which: str = "best",
    step: int | None = None,
    *,
    variables_only: bool = False,
    abstract: tuple[nnx.GraphDef, steps.State] | None = None,
) -> tuple[int, nnx.GraphDef, steps.State]:
    """(step, graphdef, train state) of the chosen checkpoint, replicated over ``mesh``.

    Restored into the model's abstract state (shapes only): nothing is initialised first and no
    ImageNet file is needed. A chosen ``best`` or ``latest`` checkpoint that cannot be restored
    is reported and set aside (``checkpointing.restore_first_intact``) and the next best or next
    older one is used; a given ``step`` that cannot be restored is an error.

    ``variables_only``: the state holds only ``params`` and ``batch_stats`` (what inference
    needs; ``steps.abstract_variables``) and only those are read, not the optimizer state.
    ``abstract``: that (graphdef, shapes) pair when the caller has built it already.
    """
    manager = open_checkpoints(workdir, config)
    try:
        chosen = choose_checkpoint(manager, which, step)
        if abstract is not None:
            graphdef, shapes = abstract
        elif variables_only:
            graphdef, shapes = steps.abstract_variables(config)
        else:
            graphdef, shapes = steps.abstract_train_state(config)
        like = sharding.replicated_shapes(shapes, mesh)
        logging.info("Restoring checkpoint %d from %s", chosen, manager.directory)
        if step is not None:
            try:
                state = checkpointing.restore(manager, step, like, variables_only)
            except Exception as e:  # whatever a damaged file raises: one line saying why
                raise checkpointing.CheckpointError(
                    f"checkpoint {step} of {manager.directory} cannot be restored: "
                    f"{checkpointing.error_reason(e)}"
                ) from e
        else:
            candidates = checkpointing.ranked_steps(manager, config, which)
            candidates.remove(chosen)
            step, state = checkpointing.restore_first_intact(
                manager,
                [chosen, *candidates],
                like,
                damaged_checkpoints_dir(workdir),
                variables_only,
            )
    finally:
        manager.close()
    return step, graphdef, state

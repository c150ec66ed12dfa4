"""Reports of a finished (or running) training run, regenerated from its workdir alone.

Reads what the trainer writes in its run directory (``run_dir``), the contract:

- ``metrics.jsonl``: one JSON object per epoch with ``epoch`` (1-based), ``step``,
  ``epoch_time_s``, ``train_loss``, ``train_accuracy``, ``train_mean_ccc`` (may be absent or
  NaN), ``val_loss``, ``val_<key>`` for every float key of ``metrics.compute_metrics`` and
  ``val_confusion_matrix``.
- ``final_metrics.json``: ``model``, ``num_classes``, ``class_names``, ``data_source``,
  ``epochs``, ``best_epoch``, ``checkpoint``, ``split``, ``metrics`` (``compute_metrics`` output)
  and ``time_per_epoch_s`` (``median``, ``min``, ``max``).

and writes ``training_curves.png``, ``confusion_matrix.png`` and ``report.md``. ``table_row``
and ``markdown_table`` build the study's comparison table (also used by
``affect-jax-compare``, ``tools/compare_runs.py``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from affect_jax import run_dir
from affect_jax.metrics import REGRESSION_METRICS, VA_DIMENSIONS, metric_key_name

TABLE_COLUMNS = (
    "model",
    "classes",
    "accuracy",
    "balanced acc",
    "macro F1",
    "AUC",
    "PR-AUC",
    "kappa",
    "RMSE",
    "CORR",
    "SAGR",
    "CCC",
    "time/epoch",
)
# Column -> key of compute_metrics' output (regression columns: mean of valence and arousal).
_METRIC_COLUMNS = {
    "accuracy": "accuracy",
    "balanced acc": "balanced_accuracy",
    "macro F1": "f1_macro",
    "AUC": "auc",
    "PR-AUC": "pr_auc",
    "kappa": "kappa",
    "RMSE": "mean_rmse",
    "CORR": "mean_corr",
    "SAGR": "mean_sagr",
    "CCC": "mean_ccc",
}

REFERENCE_LABEL = "Keras study (reference)"
# The study's results table (docs/study.md), verbatim.
REFERENCE_ROWS = (
    {
        "model": f"VGG16, {REFERENCE_LABEL}",
        "classes": "7*",
        "accuracy": "28.25%",
        "macro F1": "0.225",
        "AUC": "0.74",
        "PR-AUC": "0.305",
        "kappa": "0.18",
        "RMSE": "0.401",
        "CORR": "0.619",
        "SAGR": "0.72",
        "CCC": "0.503",
        "time/epoch": "18-42 min",
    },
    {
        "model": f"ResNet50, {REFERENCE_LABEL}",
        "classes": "7*",
        "accuracy": "40.75%",
        "macro F1": "0.397",
        "AUC": "0.773",
        "PR-AUC": "0.412",
        "kappa": "0.323",
        "RMSE": "0.369",
        "CORR": "0.687",
        "SAGR": "0.756",
        "CCC": "0.637",
        "time/epoch": "7-14 min",
    },
)
REFERENCE_NOTE = (
    "\\* The study says 7 classes, but its 3999-image release carries 8 labels "
    "(see docs/study.md). Reference regression figures are for valence/arousal "
    "together; ours are the mean of the two. The study ran on CPU."
)

_MODEL_NAMES = {"resnet50": "ResNet50", "vgg16": "VGG16"}
MISSING = "n/a"


# --- Formatting ------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_number(value: Any, digits: int = 3) -> str:
    """``0.3974`` -> ``'0.397'``; NaN, None or missing -> ``'n/a'``."""
    return f"{value:.{digits}f}" if _is_number(value) else MISSING


def format_percent(value: Any) -> str:
    """``0.4075`` -> ``'40.75%'``."""
    return f"{100 * value:.2f}%" if _is_number(value) else MISSING


def format_duration(seconds: Any) -> str:
    """Human-readable duration: ``'4.2 s'``, ``'41 s'``, ``'3.2 min'``, ``'1.5 h'``."""
    if not _is_number(seconds):
        return MISSING
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def model_display_name(model: str) -> str:
    """``'resnet50'`` -> ``'ResNet50'`` (the study's spelling); unknown names unchanged."""
    return _MODEL_NAMES.get(str(model).lower(), str(model))


# --- Tables ----------------------------------------------------------------------------------


def table_row(final_metrics: Mapping[str, Any], name: str | None = None) -> dict[str, str]:
    """One row of the study's comparison table (``TABLE_COLUMNS`` -> formatted cell).

    ``name`` (e.g. the run directory) is appended to the model to tell runs apart.
    """
    metrics = final_metrics.get("metrics", {})
    model = model_display_name(final_metrics.get("model", "?"))
    row = {
        "model": f"{model} ({name})" if name else model,
        "classes": str(
            final_metrics.get("num_classes", len(final_metrics.get("class_names", [])) or "?")
        ),
    }
    for column, key in _METRIC_COLUMNS.items():
        value = metrics.get(key)
        row[column] = (
            format_percent(value)
            if column in ("accuracy", "balanced acc")
            else format_number(value)
        )
    row["time/epoch"] = format_duration(final_metrics.get("time_per_epoch_s", {}).get("median"))
    return row


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = TABLE_COLUMNS
) -> str:
    """Renders rows (mappings column -> cell) as a GitHub Markdown table."""

    def cell(value: Any) -> str:
        # A pipe inside a cell would split it into two columns.
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def comparison_table(
    final_metrics_list: Sequence[Mapping[str, Any]],
    names: Sequence[str | None] | None = None,
    reference: bool = True,
) -> str:
    """The study's table for several runs, plus (optionally) the study's own rows and note."""
    names = names if names is not None else [None] * len(final_metrics_list)
    rows = [table_row(fm, n) for fm, n in zip(final_metrics_list, names, strict=True)]
    if reference:
        # The study did not report balanced accuracy: n/a in its rows.
        rows += [{**{c: MISSING for c in TABLE_COLUMNS}, **r} for r in REFERENCE_ROWS]
    text = markdown_table(rows)
    return text + ("\n" + REFERENCE_NOTE + "\n" if reference else "")


def _per_dimension_table(metrics: Mapping[str, Any]) -> str:
    columns = ("dimension", "RMSE", "CORR", "SAGR", "CCC")
    rows = [
        {
            "dimension": dim,
            **{
                c: format_number(metrics.get(f"{dim}_{m}"))
                for c, m in zip(columns[1:], REGRESSION_METRICS, strict=True)
            },
        }
        for dim in (*VA_DIMENSIONS, "mean")
    ]
    return markdown_table(rows, columns)


def _per_class_table(metrics: Mapping[str, Any], class_names: Sequence[str]) -> str:
    confusion = metrics.get("confusion_matrix")
    columns = ("class", "precision", "recall", "F1", "support")
    rows = []
    for k, name in enumerate(class_names):
        key = metric_key_name(name)
        rows.append(
            {
                "class": name,
                "precision": format_number(metrics.get(f"precision_{key}")),
                "recall": format_number(metrics.get(f"recall_{key}")),
                "F1": format_number(metrics.get(f"f1_{key}")),
                "support": str(sum(confusion[k])) if confusion else MISSING,
            }
        )
    return markdown_table(rows, columns)


def _epoch_table(history: Sequence[Mapping[str, Any]], best_epoch: Any) -> str:
    columns = (
        "epoch",
        "train loss",
        "val loss",
        "train acc",
        "val acc",
        "val bal acc",
        "train CCC",
        "val CCC",
        "time",
    )
    rows = []
    for r in history:
        epoch = str(r.get("epoch"))
        rows.append(
            {
                "epoch": f"**{epoch}**" if r.get("epoch") == best_epoch else epoch,
                "train loss": format_number(r.get("train_loss"), 4),
                "val loss": format_number(r.get("val_loss"), 4),
                "train acc": format_percent(r.get("train_accuracy")),
                "val acc": format_percent(r.get("val_accuracy")),
                "val bal acc": format_percent(r.get("val_balanced_accuracy")),
                "train CCC": format_number(r.get("train_mean_ccc")),
                "val CCC": format_number(r.get("val_mean_ccc")),
                "time": format_duration(r.get("epoch_time_s")),
            }
        )
    return markdown_table(rows, columns)


# --- Figures ---------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    # Figure + Agg canvas, not pyplot: no global backend switch, no figures left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and values of ``key`` where it is present and finite."""
    points = [(r["epoch"], r[key]) for r in history if _is_number(r.get(key))]
    if not points:
        return np.zeros(0), np.zeros(0)
    epochs, values = zip(*points, strict=True)
    return np.asarray(epochs, float), np.asarray(values, float)


def plot_training_curves(
    history: Sequence[Mapping[str, Any]],
    path: str | Path,
    title: str = "",
    best_epoch: int | None = None,
) -> Path:
    """Loss, accuracy and mean CCC per epoch, train vs validation, in three panels."""
    fig = _new_figure(13, 4)
    axes = fig.subplots(1, 3)
    panels = (
        ("loss", "loss", 1.0),
        ("accuracy", "accuracy (%)", 100.0),
        ("mean_ccc", "mean CCC (valence, arousal)", 1.0),
    )
    all_epochs = [r["epoch"] for r in history]
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        plotted = False
        for split, style in (("train", "-o"), ("val", "-s")):
            epochs, values = _series(history, f"{split}_{key}")
            if epochs.size:
                name = "validation" if split == "val" else split
                ax.plot(epochs, values * scale, style, markersize=3, label=name)
                plotted = True
        if not plotted:
            ax.text(
                0.5,
                0.5,
                "not recorded\n(no valence/arousal?)" if key == "mean_ccc" else "not recorded",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="gray",
            )
        if best_epoch is not None and plotted:
            ax.axvline(
                best_epoch,
                color="gray",
                linestyle=":",
                linewidth=1,
                label=f"best epoch ({best_epoch})",
            )
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if all_epochs:
            ax.set_xlim(min(all_epochs) - 0.5, max(all_epochs) + 0.5)
            # Integer ticks only: epochs are whole numbers.
            ax.xaxis.get_major_locator().set_params(integer=True)
        if plotted:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path)
    return path


def plot_confusion_matrix(
    confusion: Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """Counts and row-normalised (per true class) confusion matrices side by side."""
    counts = np.asarray(confusion, dtype=np.int64)
    num_classes = counts.shape[0]
    support = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        # A class absent from the split has no row to normalise: NaN, drawn blank.
        normalised = np.where(support > 0, counts / np.maximum(support, 1), np.nan)

    side = max(5.0, 0.6 * num_classes + 2.5)
    fig = _new_figure(2 * side + 1, side)
    axes = fig.subplots(1, 2)
    panels = ((counts, "counts", "d", None), (normalised, "row-normalised (recall)", ".2f", 1.0))
    for ax, (matrix, label, fmt, vmax) in zip(axes, panels, strict=True):
        image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=vmax)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        finite_max = np.nanmax(matrix) if np.isfinite(matrix).any() else 0
        for i in range(num_classes):
            for j in range(num_classes):
                value = matrix[i, j]
                if np.isnan(value):
                    continue
                # Light text on dark cells so numbers stay readable.
                dark = value > 0.6 * (vmax if vmax is not None else finite_max)
                ax.text(
                    j,
                    i,
                    format(value, fmt),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
        ax.set_xticks(range(num_classes), class_names, rotation=45, ha="right")
        ax.set_yticks(range(num_classes), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(label)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path)
    return path


# --- Report ----------------------------------------------------------------------------------


def render_markdown(
    final_metrics: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    images: Mapping[str, Path],
) -> str:
    """The text of ``report.md``."""
    metrics = final_metrics.get("metrics", {})
    class_names = list(final_metrics.get("class_names", []))
    model = model_display_name(final_metrics.get("model", "?"))
    times = final_metrics.get("time_per_epoch_s", {})
    best_epoch = final_metrics.get("best_epoch")
    num_classes = final_metrics.get("num_classes", len(class_names))
    out = [f"# {model}: {num_classes}-class expression and valence/arousal\n"]
    out.append("| setting | value |\n| --- | --- |")
    time_range = (
        f"{format_duration(times.get('median'))} ({format_duration(times.get('min'))}"
        f" - {format_duration(times.get('max'))})"
    )
    for label, value in (
        ("model", final_metrics.get("model")),
        ("data source", final_metrics.get("data_source")),
        ("classes", ", ".join(class_names)),
        ("epochs", final_metrics.get("epochs")),
        ("best epoch", best_epoch),
        ("evaluated checkpoint", final_metrics.get("checkpoint")),
        ("evaluated split", final_metrics.get("split")),
        ("time/epoch: median (min - max)", time_range),
    ):
        out.append(f"| {label} | {value if value is not None else MISSING} |")

    out.append(
        f"\n## Comparison with the study\n\nMetrics on the "
        f"{final_metrics.get('split', 'validation')} split.\n"
    )
    out.append(comparison_table([final_metrics]))

    out.append("## Valence and arousal\n")
    if any(f"mean_{m}" in metrics for m in REGRESSION_METRICS):
        out.append("Predictions clipped to [-1, 1] before scoring.\n")
        out.append(_per_dimension_table(metrics))
    else:
        out.append("Not scored: the data has no valence/arousal annotations.\n")

    out.append("## Per class\n")
    out.append(_per_class_table(metrics, class_names))

    if "confusion_matrix" in images:
        out.append(f"![confusion matrix]({images['confusion_matrix'].name})\n")
    if history:
        out.append("## Training\n")
        if "training_curves" in images:
            out.append(f"![training curves]({images['training_curves'].name})\n")
        out.append(f"Best epoch in bold.\n\n{_epoch_table(history, best_epoch)}")
    return "\n".join(out)


def write_reports(workdir: str | Path) -> dict[str, Path]:
    """Writes ``training_curves.png``, ``confusion_matrix.png`` and ``report.md`` in workdir.

    Needs ``final_metrics.json``. Without ``metrics.jsonl`` the curves are skipped (with a
    warning). Returns the written files by name (``training_curves``, ``confusion_matrix``,
    ``report``).
    """
    workdir = Path(workdir)
    final_metrics = run_dir.load_final_metrics(workdir)
    history = run_dir.load_history(workdir)
    model = model_display_name(final_metrics.get("model", "?"))
    class_names = list(final_metrics.get("class_names", []))
    written: dict[str, Path] = {}

    if history:
        written["training_curves"] = plot_training_curves(
            history,
            workdir / run_dir.TRAINING_CURVES,
            title=f"{model}: training curves",
            best_epoch=final_metrics.get("best_epoch"),
        )
    else:
        warnings.warn(
            f"{workdir}: no {run_dir.METRICS_HISTORY}; training curves skipped", stacklevel=2
        )

    confusion = final_metrics.get("metrics", {}).get("confusion_matrix")
    if confusion:
        written["confusion_matrix"] = plot_confusion_matrix(
            confusion,
            class_names,
            workdir / run_dir.CONFUSION_MATRIX,
            title=f"{model}: confusion matrix ({final_metrics.get('split', 'validation')}, "
            f"{final_metrics.get('checkpoint', '?')} checkpoint)",
        )

    report = workdir / run_dir.REPORT
    report.write_text(render_markdown(final_metrics, history, written))
    written["report"] = report
    return written

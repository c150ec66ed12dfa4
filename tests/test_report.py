"""Reports regenerated from a fake workdir; the tables parsed back against the metrics JSON."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from affect_jax import report, run_dir
from affect_jax.metrics import compute_metrics
from affect_jax.tools import compare_runs

REPO = Path(__file__).resolve().parent.parent
NAMES8 = ["Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt"]


# The study's published results (its table, reproduced in docs/study.md), written out here so
# that neither report.py's constants nor the docs can drift from them unnoticed.
STUDY_COLUMNS = (
    "accuracy",
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
STUDY_RESULTS = {
    "VGG16": [
        "28.25%",
        "0.225",
        "0.74",
        "0.305",
        "0.18",
        "0.401",
        "0.619",
        "0.72",
        "0.503",
        "18-42 min",
    ],
    "ResNet50": [
        "40.75%",
        "0.397",
        "0.773",
        "0.412",
        "0.323",
        "0.369",
        "0.687",
        "0.756",
        "0.637",
        "7-14 min",
    ],
}


def fake_metrics(seed, num_classes=8, with_va=True, n=240):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, n - num_classes)])
    logits = rng.normal(size=(n, num_classes)) + 2.0 * np.eye(num_classes)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    va_true = rng.uniform(-1, 1, (n, 2)) if with_va else None
    va_pred = (0.6 * va_true + rng.normal(0, 0.3, (n, 2))) if with_va else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # A rarely predicted class may warn; irrelevant here.
        return compute_metrics(labels, probs, va_true, va_pred, NAMES8[:num_classes])


def make_workdir(
    path: Path, model="resnet50", seed=0, num_classes=8, with_va=True, epochs=3
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for epoch in range(1, epochs + 1):
        val = fake_metrics(seed * 100 + epoch, num_classes, with_va)
        record = {
            "epoch": epoch,
            "step": 100 * epoch,
            "epoch_time_s": 40.0 + epoch,
            "train_loss": 2.0 / epoch,
            "train_accuracy": 0.2 * epoch,
            "val_loss": 2.2 / epoch,
        }
        if with_va and epoch == 1:
            record["train_mean_ccc"] = 0.3
        elif with_va and epoch == 3:
            record["train_mean_ccc"] = float("nan")  # Epoch 2: absent; epoch 3: NaN.
        record |= {f"val_{k}": v for k, v in val.items()}
        lines.append(json.dumps(record))
    (path / run_dir.METRICS_HISTORY).write_text("\n".join(lines) + "\n")
    final = {
        "model": model,
        "num_classes": num_classes,
        "class_names": NAMES8[:num_classes],
        "data_source": "synthetic",
        "epochs": epochs,
        "best_epoch": 2,
        "checkpoint": "best",
        "split": "validation",
        "metrics": fake_metrics(seed * 100 + 2, num_classes, with_va),
        "time_per_epoch_s": {"median": 192.0, "min": 41.0, "max": 250.0},
    }
    (path / run_dir.FINAL_METRICS).write_text(json.dumps(final))
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def parse_table(text: str, first_header: str) -> list[dict[str, str]]:
    """The Markdown table whose header starts with ``first_header``, as dicts."""
    lines = text.splitlines()
    start = next(
        i
        for i, line in enumerate(lines[:-1])
        if line.startswith(f"| {first_header} |") and lines[i + 1].startswith("| ---")
    )
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, [c.strip() for c in line.strip("|").split("|")], strict=True)))
    return rows


def assert_cell(cell: str, value, digits=3):
    if value is None or not math.isfinite(value):
        assert cell == report.MISSING
    else:
        assert float(cell) == pytest.approx(value, abs=0.5 * 10**-digits + 1e-12)


def test_write_reports(tmp_path):
    workdir = make_workdir(tmp_path / "run")
    written = report.write_reports(workdir)
    assert set(written) == {"training_curves", "confusion_matrix", "report"}
    for name in ("training_curves", "confusion_matrix"):
        path = written[name]
        assert path == workdir / f"{name}.png"
        width, height = png_size(path)
        assert 600 <= width <= 3000 and 300 <= height <= 2000
        assert path.stat().st_size > 20_000

    text = written["report"].read_text()
    final = json.loads((workdir / run_dir.FINAL_METRICS).read_text())
    m = final["metrics"]
    rows = parse_table(text, "model")
    ours = rows[0]
    assert ours["model"] == "ResNet50" and ours["classes"] == "8"
    assert ours["accuracy"].endswith("%")
    assert float(ours["accuracy"][:-1]) == pytest.approx(100 * m["accuracy"], abs=0.005 + 1e-12)
    assert float(ours["balanced acc"][:-1]) == pytest.approx(
        100 * m["balanced_accuracy"], abs=0.005 + 1e-12
    )
    for column, key in (
        ("macro F1", "f1_macro"),
        ("AUC", "auc"),
        ("PR-AUC", "pr_auc"),
        ("kappa", "kappa"),
        ("RMSE", "mean_rmse"),
        ("CORR", "mean_corr"),
        ("SAGR", "mean_sagr"),
        ("CCC", "mean_ccc"),
    ):
        assert_cell(ours[column], m[key])
    assert ours["time/epoch"] == "3.2 min"
    assert [r["model"] for r in rows[1:]] == [
        f"VGG16, {report.REFERENCE_LABEL}",
        f"ResNet50, {report.REFERENCE_LABEL}",
    ]
    for row, (model, values) in zip(rows[1:], STUDY_RESULTS.items(), strict=True):
        assert row["classes"] == "7*" and row["balanced acc"] == "n/a"  # not in the study
        assert [row[c] for c in STUDY_COLUMNS] == values, model

    dims = {r["dimension"]: r for r in parse_table(text, "dimension")}
    assert set(dims) == {"valence", "arousal", "mean"}
    for dim, row in dims.items():
        for column in ("RMSE", "CORR", "SAGR", "CCC"):
            assert_cell(row[column], m[f"{dim}_{column.lower()}"])

    per_class = parse_table(text, "class")
    assert [r["class"] for r in per_class] == NAMES8
    for k, row in enumerate(per_class):
        key = NAMES8[k].lower()
        assert_cell(row["precision"], m[f"precision_{key}"])
        assert_cell(row["recall"], m[f"recall_{key}"])
        assert_cell(row["F1"], m[f"f1_{key}"])
        assert int(row["support"]) == sum(m["confusion_matrix"][k])

    epochs = parse_table(text, "epoch")
    assert [r["epoch"] for r in epochs] == ["1", "**2**", "3"]
    assert [r["train CCC"] for r in epochs] == ["0.300", "n/a", "n/a"]
    assert "![training curves](training_curves.png)" in text
    assert "![confusion matrix](confusion_matrix.png)" in text


def test_without_valence_arousal_and_history(tmp_path, monkeypatch):
    workdir = make_workdir(tmp_path / "run", model="vgg16", num_classes=7, with_va=False)
    written = report.write_reports(workdir)
    png_size(written["training_curves"])
    text = written["report"].read_text()
    ours = parse_table(text, "model")[0]
    assert ours["model"] == "VGG16" and ours["classes"] == "7"
    assert all(ours[c] == "n/a" for c in ("RMSE", "CORR", "SAGR", "CCC"))
    assert "Not scored" in text

    (workdir / run_dir.METRICS_HISTORY).unlink()
    monkeypatch.setattr(report, "plot_confusion_matrix", lambda *a, **k: workdir / "cm.png")
    with pytest.warns(UserWarning, match="training curves skipped"):
        written = report.write_reports(workdir)
    assert "training_curves" not in written


def test_reference_rows_are_the_studys_published_numbers():
    assert [r["model"] for r in report.REFERENCE_ROWS] == [
        f"{model}, {report.REFERENCE_LABEL}" for model in STUDY_RESULTS
    ]
    for row, values in zip(report.REFERENCE_ROWS, STUDY_RESULTS.values(), strict=True):
        assert [row[c] for c in STUDY_COLUMNS] == values, row["model"]
    # docs/study.md's results table shows the same numbers.
    study = (REPO / "docs" / "study.md").read_text()
    docs_rows = {r["model"]: r for r in parse_table(study, "model")}
    assert [docs_rows[m][c] for m in STUDY_RESULTS for c in STUDY_COLUMNS] == [
        v for values in STUDY_RESULTS.values() for v in values
    ]


def test_history_dedupes_epochs_and_reports_bad_lines(tmp_path):
    path = tmp_path / run_dir.METRICS_HISTORY
    path.write_text('{"epoch": 2, "x": 1}\n{"epoch": 1, "x": NaN}\n\n{"epoch": 2, "x": 3}\n')
    history = run_dir.load_history(tmp_path)
    assert [r["epoch"] for r in history] == [1, 2] and history[1]["x"] == 3
    assert math.isnan(history[0]["x"])
    path.write_text('{"epoch": 1}\n{"epoch": 2, "x"')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        run_dir.load_history(tmp_path)
    with pytest.raises(FileNotFoundError, match="final_metrics.json"):
        run_dir.load_final_metrics(tmp_path)


@pytest.mark.parametrize(
    "seconds,text",
    [
        (4.23, "4.2 s"),
        (41.4, "41 s"),
        (192, "3.2 min"),
        (5400, "1.5 h"),
        (float("nan"), "n/a"),
        (None, "n/a"),
    ],
)
def test_format_duration(seconds, text):
    assert report.format_duration(seconds) == text


def test_make_report_command(tmp_path):
    workdir = make_workdir(tmp_path / "run")
    # The affect-jax-report console script (its module's ``run``).
    cmd = [sys.executable, "-m", "affect_jax.tools.make_report", f"--workdir={workdir}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [
        str(workdir / name) for name in ("training_curves.png", "confusion_matrix.png", "report.md")
    ]


def test_compare_runs(tmp_path, capsys, caplog):
    a = make_workdir(tmp_path / "vgg_run", model="vgg16", seed=1)
    b = make_workdir(tmp_path / "resnet_run", model="resnet50", seed=2)
    # The affect-jax-compare console script (its module's ``run``).
    cmd = [sys.executable, "-m", "affect_jax.tools.compare_runs", str(a), str(b)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
    rows = parse_table(out, "model")
    assert [r["model"] for r in rows] == [
        "VGG16 (vgg_run)",
        "ResNet50 (resnet_run)",
        f"VGG16, {report.REFERENCE_LABEL}",
        f"ResNet50, {report.REFERENCE_LABEL}",
    ]
    for row, workdir in zip(rows, (a, b), strict=False):
        m = run_dir.load_final_metrics(workdir)["metrics"]
        assert_cell(row["CCC"], m["mean_ccc"])
        assert_cell(row["kappa"], m["kappa"])

    # In-process for the remaining cases (each subprocess pays the imports again).
    if "no-reference" not in flags.FLAGS:
        compare_runs.define_flags()
    with flagsaver.flagsaver(**{"no-reference": True}):
        assert compare_runs.main(["affect-jax-compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "reference" not in out and len(parse_table(out, "model")) == 2
    assert compare_runs.main(["affect-jax-compare", str(a), str(tmp_path / "nothing")]) == 1
    assert "nothing" in caplog.text


def test_confusion_matrix_with_absent_class(tmp_path, monkeypatch):
    """Class "b" has no sample: its counts row is drawn as zeros, its row-normalised row is
    blank (NaN, no numbers written), not normalised into fake recalls; the others are their
    rows divided by their supports."""
    figures = []
    new_figure = report._new_figure
    monkeypatch.setattr(
        report, "_new_figure", lambda *a: figures.append(new_figure(*a)) or figures[-1]
    )
    confusion = [[3, 1, 0], [0, 0, 0], [1, 0, 2]]
    path = report.plot_confusion_matrix(confusion, ["a", "b", "c"], tmp_path / "cm.png")
    width, height = png_size(path)
    assert width > 500 and height > 200
    (fig,) = figures
    counts_ax, normalised_ax = (ax for ax in fig.axes if ax.images)
    np.testing.assert_array_equal(counts_ax.images[0].get_array(), confusion)
    shown = np.ma.filled(normalised_ax.images[0].get_array().astype(float), np.nan)
    expected = np.array([[0.75, 0.25, 0.0], [np.nan] * 3, [1 / 3, 0.0, 2 / 3]])
    np.testing.assert_allclose(shown, expected, rtol=1e-12)
    texts = {(t.get_position(), t.get_text()) for t in normalised_ax.texts}
    assert {pos[1] for pos, _ in texts} == {0, 2}  # no number in the absent class's row
    assert ((0, 0), "0.75") in texts and ((2, 2), "0.67") in texts
    assert {t.get_position()[1] for t in counts_ax.texts} == {0, 1, 2}

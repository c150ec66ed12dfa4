r"""Trains the demo on an imbalanced version of the drawn faces with each imbalance setting and
prints macro F1 and balanced accuracy per setting and seed (the table in docs/imbalance.md).

    python scripts/imbalance_study.py --out=runs/imbalance [--epochs=15] [--seeds 0 1]

Each run is ``configs/demo.py`` with ``data.synthetic_class_fractions`` set to ``--fractions``
(by default 500 Neutral, 425 Happy and 10-50 faces of each other class, shaped like the public
collection in docs/imbalance.md) and one setting: ``none``, ``inverse_frequency`` (class
weights), ``effective_number`` or ``balanced`` (class-balanced sampling). The validation split is
a stratified 20% of that imbalanced pool (scored at the best epoch by the demo's best_metric);
the test split is the source's balanced held-out pool (100 faces per class), scored at the last
epoch. Runs already finished in ``--out`` are reused, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {
    "none": [],
    "inverse_frequency": ["--config.loss_weights.class_weighting=inverse_frequency"],
    "effective_number": ["--config.loss_weights.class_weighting=effective_number"],
    "balanced": ["--config.data.sampling=balanced"],
}
# Neutral, Happy, Sad, Surprise, Fear, Disgust, Anger, Contempt: of 500 drawn faces each.
DEFAULT_FRACTIONS = (1.0, 0.85, 0.1, 0.1, 0.04, 0.1, 0.1, 0.02)
METRICS = (
    ("f1_macro", "macro F1"),
    ("balanced_accuracy", "balanced acc"),
    ("accuracy", "accuracy"),
)


def run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        result = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}; see {log}")


def train_and_test(workdir: Path, flags: list[str]) -> tuple[dict, dict]:
    """Final validation metrics and the latest checkpoint's test metrics of one run."""
    base = [
        sys.executable,
        "-m",
        "affect_jax.main",
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        *flags,
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "final_metrics.json").is_file():
        run(base, workdir / "run.log")
    test = workdir / "eval_test_latest.json"
    if not test.is_file():
        run(base + ["--mode=eval", "--split=test", "--checkpoint=latest"], workdir / "run.log")
    return (
        json.loads((workdir / "final_metrics.json").read_text())["metrics"],
        json.loads(test.read_text())["metrics"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Directory for the runs.")
    parser.add_argument("--epochs", type=int, default=15, help="Epochs per run (demo: 15).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["none", "inverse_frequency", "balanced"],
        choices=sorted(SETTINGS),
    )
    parser.add_argument(
        "--fractions",
        type=float,
        nargs=8,
        default=DEFAULT_FRACTIONS,
        help="Fraction of each class's 500 drawn faces kept for training.",
    )
    args = parser.parse_args(argv)
    fractions = "(" + ", ".join(f"{f:g}" for f in args.fractions) + ")"
    header = ["setting", "seed"] + [
        f"{split} {name}" for split in ("val", "test") for _, name in METRICS
    ]
    rows = []
    for setting in args.settings:
        scores = []
        for seed in args.seeds:
            flags = [
                f"--config.seed={seed}",
                f"--config.num_epochs={args.epochs}",
                f"--config.data.synthetic_class_fractions={fractions}",
                *SETTINGS[setting],
            ]
            val, test = train_and_test(args.out / f"{setting}_seed{seed}", flags)
            scores.append([m[k] for m in (val, test) for k, _ in METRICS])
            rows.append([setting, str(seed)] + [f"{v:.3f}" for v in scores[-1]])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
        means = [sum(s[i] for s in scores) / len(scores) for i in range(len(scores[0]))]
        rows.append([f"**{setting}**", "mean"] + [f"**{v:.3f}**" for v in means])
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

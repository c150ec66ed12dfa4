"""Applies named mutations (deliberate bugs) to a copy of the repository and runs their tests.

Each mutation is one text substitution in a file (under affect_jax/, or a test helper) and the
tests that must catch it. For each mutation named (or all), the tracked files of this checkout
(plus the built extension, if any) are copied to a temporary directory, the substitution is
applied there, and the tests run in that copy with pytest. A mutation is "caught" when a test
fails, "missed" when all pass. ``--tests-from=REF`` takes tests/ from a git ref instead (e.g.
``main``), to show that an older test let the bug through ("no test": the ref has none of its
tests). The checkout itself is never modified.

    python scripts/mutation_check.py --list
    python scripts/mutation_check.py ccc_loss_summed report_absent_class_zero
    python scripts/mutation_check.py --tests-from=main   # every mutation, main's tests
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutation:
    path: str  # relative to the repository root
    old: str  # must occur exactly once in `path`
    new: str
    tests: tuple[str, ...]  # pytest node ids (or files) that must catch it
    what: str


_LAYOUT_RUN = "tests/test_affectnet_main.py::test_main_trains_and_evaluates_on_each_layout"
MUTATIONS = {
    "scan_loss_off_by_1e-4": Mutation(
        "affect_jax/steps.py",
        "return jax.lax.scan(train_step, state, batches)",
        "state, out = jax.lax.scan(train_step, state, batches)\n"
        '        return state, {**out, "loss": out["loss"] * (1 + 1e-4)}',
        ("tests/test_steps.py::test_several_steps_per_call_match_one_step_per_call",),
        "several steps per call report each step's loss off by 1e-4 relative",
    ),
    "skips_counted_per_location": Mutation(
        "tests/conftest.py",
        'counts[report.longrepr[2].removeprefix("Skipped: ")] += 1',
        "counts[report.longrepr[:2]] += 1",
        ("tests/test_ops.py::test_skips_are_counted_per_reason",),
        "the skip summary counts per location (as -rs does), not per reason",
    ),
    "drop_counted_twice": Mutation(
        "affect_jax/data/affectnet/report.py",
        "self.counts[reason] += 1",
        "self.counts[reason] += 2",
        (f"{_LAYOUT_RUN}[manifest]",),
        "every dropped row is counted twice in data_report.json",
    ),
    "single_drop_not_logged": Mutation(
        "affect_jax/data/affectnet/report.py",
        "            if n:\n                logging.warning(",
        "            if n > 1:\n                logging.warning(",
        (f"{_LAYOUT_RUN}[manifest]",),
        "a reason with a single dropped row is left out of the run's log",
    ),
    "winograd_relu_dropped": Mutation(
        "affect_jax/ops/conv.py",
        "return winograd.conv3x3(x, kernel, bias, pads, relu)",
        "return winograd.conv3x3(x, kernel, bias, pads, False)",
        ("tests/test_ops.py::test_model_gradients_agree_across_impls",),
        "the Winograd path drops the fused ReLU",
    ),
    "dot1x1_off_by_3e-6": Mutation(
        "affect_jax/ops/conv.py",
        "jax.lax.dot_general(cols, kernel.reshape(cin, cout),",
        "jax.lax.dot_general(cols, kernel.reshape(cin, cout) * (1 + 3e-6),",
        ("tests/test_ops.py::test_model_gradients_agree_across_impls",),
        "1x1 convolutions as dots are off by 3e-6 relative (25x float32 epsilon)",
    ),
    "ccc_weights_ignored": Mutation(
        "affect_jax/steps.py",
        "n = jnp.maximum(w.sum(), 1.0)",
        "n = jnp.maximum(jnp.float32(w.size), 1.0)",
        ("tests/test_steps.py::test_weighted_ccc_matches_numpy",),
        "weighted_ccc divides the weighted sums by the row count, not the weight sum",
    ),
    "ccc_loss_summed": Mutation(
        "affect_jax/steps.py",
        'terms["ccc_loss"] = (1.0 - ccc).mean()',
        'terms["ccc_loss"] = (1.0 - ccc).sum()',
        ("tests/test_steps.py::test_ccc_loss_term_is_added_when_weighted",),
        "the CCC loss term sums (1 - CCC) over valence and arousal instead of averaging",
    ),
    "ccc_counts_rows_without_va": Mutation(
        "affect_jax/steps.py",
        'batch["valence_arousal"][:, d], outputs["valence_arousal"][:, d], va_weight',
        'batch["valence_arousal"][:, d], outputs["valence_arousal"][:, d], mask',
        ("tests/test_steps.py::test_ccc_loss_term_is_added_when_weighted",),
        "the CCC loss term counts rows without valence/arousal (has_va 0)",
    ),
    "report_absent_class_zero": Mutation(
        "affect_jax/report.py",
        "normalised = np.where(support > 0, counts / np.maximum(support, 1), np.nan)",
        "normalised = counts / np.maximum(support, 1)",
        ("tests/test_report.py::test_confusion_matrix_with_absent_class",),
        "an absent class's row is plotted as zeros (fake recall 0.00) instead of blank",
    ),
    "report_reference_typo": Mutation(
        "affect_jax/report.py",
        '"kappa": "0.323",',
        '"kappa": "0.332",',
        (
            "tests/test_report.py::test_write_reports",
            "tests/test_report.py::test_reference_rows_are_the_studys_published_numbers",
        ),
        "a digit of the study's published ResNet50 kappa is swapped",
    ),
}


def _copy_checkout(dest: str, tests_from: str | None) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = os.path.join(REPO, rel)
        if os.path.isfile(src):  # a tracked file deleted in the checkout is skipped
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    for built in glob.glob(os.path.join(REPO, "affect_jax", "ops", "_native*.so")):
        shutil.copy2(built, os.path.join(dest, "affect_jax", "ops"))
    if tests_from:
        shutil.rmtree(os.path.join(dest, "tests"))
        archive = subprocess.run(
            ["git", "archive", "--format=tar", tests_from, "tests"],
            cwd=REPO,
            check=True,
            capture_output=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")


def _apply(root: str, m: Mutation) -> None:
    path = os.path.join(root, m.path)
    with open(path) as f:
        text = f.read()
    if text.count(m.old) != 1:
        raise SystemExit(
            f"{m.path}: the mutation's text occurs {text.count(m.old)} times, expected once: "
            f"{m.old!r}"
        )
    with open(path, "w") as f:
        f.write(text.replace(m.old, m.new))


def _existing(root: str, tests: tuple[str, ...]) -> list[str]:
    """The node ids of `tests` whose file and test function exist under `root` (an older
    tests/ may not have a test added since)."""
    found = []
    for node in tests:
        path, _, func = node.partition("::")
        if not os.path.exists(os.path.join(root, path)):
            continue
        with open(os.path.join(root, path)) as f:
            if not func or f"def {func.split('[')[0]}(" in f.read():
                found.append(node)
    return found


def run_mutation(name: str, tests_from: str | None, verbose: bool) -> str:
    """'caught', 'missed', 'no test' (none of its tests exists in this tests/) or 'error'
    (pytest could not run the tests)."""
    m = MUTATIONS[name]
    with tempfile.TemporaryDirectory(prefix=f"mutation_{name}_") as root:
        _copy_checkout(root, tests_from)
        tests = _existing(root, m.tests)
        if not tests:
            return "no test"
        _apply(root, m)
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
        result = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if verbose:
        print(result.stdout[-3000:], result.stderr[-2000:], sep="\n")
    # pytest's exit codes: 0 all passed, 1 some failed, others: could not run as asked.
    return {0: "missed", 1: "caught"}.get(result.returncode, "error")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--tests-from", help="git ref whose tests/ to run (e.g. main)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show pytest's output")
    args = parser.parse_args()
    if args.list:
        for name, m in MUTATIONS.items():
            print(f"{name}: {m.what}\n  {m.path}; tests: {' '.join(m.tests)}")
        return 0
    unknown = [n for n in args.names if n not in MUTATIONS]
    if unknown:
        print(f"unknown mutation(s) {unknown}; --list shows the {len(MUTATIONS)} names")
        return 2
    outcomes = {}
    for name in args.names or list(MUTATIONS):
        start = time.monotonic()
        outcomes[name] = run_mutation(name, args.tests_from, args.verbose)
        print(f"{name}: {outcomes[name]} ({time.monotonic() - start:.0f} s)", flush=True)
    tests = f"tests from {args.tests_from}" if args.tests_from else "this checkout's tests"
    missed = [n for n, o in outcomes.items() if o != "caught"]
    print(f"{len(outcomes) - len(missed)}/{len(outcomes)} caught with {tests}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

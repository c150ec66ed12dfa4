"""The data report: kept/dropped counts per drop reason, with the first offending files, as
preparation records them and as a run logs them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from absl import logging

# Each dropped example is counted once, under the first of these it fails (in this order).
DROP_REASONS = (
    "dropped_malformed_row",
    "dropped_missing_annotation",
    "dropped_unknown_label",
    "dropped_no_majority",  # FER+: no class holds a majority of the annotators' votes.
    "dropped_non_emotion",
    "dropped_contempt",
    "dropped_bad_valence_arousal",
    "dropped_missing_image",
    "dropped_undecodable_image",
)
COUNT_KEYS = ("kept",) + DROP_REASONS
REPORT_EXAMPLES = 20  # Offending files kept per reason in the report.
LOGGED_EXAMPLES = 5  # Offending files logged per drop reason (the report keeps more).


class Tally:
    """Kept/dropped counts of one split, with the first offending files per reason."""

    def __init__(self):
        self.counts = {k: 0 for k in COUNT_KEYS}
        self.examples: dict[str, list[str]] = {r: [] for r in DROP_REASONS}

    def drop(self, reason: str, name: str, detail: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < REPORT_EXAMPLES:
            self.examples[reason].append(f"{name}: {detail}")


def format_counts(counts: Mapping[str, int]) -> str:
    """'kept 3500, dropped_contempt 499' (zero drops left out)."""
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v or k == "kept")


def total_counts(split_counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """The counts of several splits summed per key (``COUNT_KEYS``, missing keys as 0)."""
    totals = {k: 0 for k in COUNT_KEYS}
    for counts in split_counts:
        for k in COUNT_KEYS:
            totals[k] += int(counts.get(k, 0))
    return totals


def log_report(report: Mapping) -> None:
    """Logs a prepared dataset's report: totals, then each pool with its drops and offenders."""
    logging.info(
        "Data: %s layout at %s, %d classes%s: %s",
        report["layout"],
        report["data_dir"],
        report["num_classes"],
        "" if report["has_valence_arousal"] else " (no valence/arousal)",
        format_counts(report["counts"]),
    )
    for pool_name, split in report["splits"].items():
        logging.info(
            "  pool %r <- %s: %s", pool_name, split["source"], format_counts(split["counts"])
        )
        for reason in DROP_REASONS:
            n = split["counts"].get(reason, 0)
            if n:
                logging.warning(
                    "  %s: %d %s, e.g. %s",
                    split["source"],
                    n,
                    reason,
                    "; ".join(split["examples"][reason][:LOGGED_EXAMPLES]),
                )

"""Writers of tiny FER2013, FER+ and RAF-DB files in the real formats (with the malformed rows
users meet), shared by the dataset tests."""

import csv
import os

import numpy as np

from tests.affectnet_files import RED, write_bytes, write_jpeg

FER_HEADER = ["emotion", "pixels", "Usage"]
FERPLUS_HEADER = [
    "Usage",
    "Image name",
    "neutral",
    "happiness",
    "surprise",
    "sadness",
    "anger",
    "disgust",
    "fear",
    "contempt",
    "unknown",
    "NF",
]
# FER2013 classes 0-6 (Angry ... Neutral) -> the project's codes (Neutral 0 ... Anger 6).
FER_TO_PROJECT = {0: 6, 1: 5, 2: 4, 3: 1, 4: 2, 5: 3, 6: 0}
# RAF-DB labels 1-7 (Surprise ... Neutral) -> the project's codes.
RAF_TO_PROJECT = {1: 3, 2: 4, 3: 5, 4: 1, 5: 2, 6: 6, 7: 0}


def face_pixels(seed):
    """A FER2013 'pixels' field: 2,304 space-separated values, distinct per seed."""
    values = (np.arange(48 * 48) * (seed + 1) + 7 * seed) % 256
    return " ".join(str(v) for v in values)


def write_rows(path, header, rows):
    """A CSV as the releases write it (comma-separated, header first)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def fer2013_rows(per_class=2):
    """Good rows: per_class of each class 0-6 in Training, one each in PublicTest and
    PrivateTest; seed = row index."""
    rows = []
    for usage, n in (("Training", per_class), ("PublicTest", 1), ("PrivateTest", 1)):
        for c in range(7):
            for _ in range(n):
                rows.append([str(c), face_pixels(len(rows)), usage])
    return rows


FER_BAD_ROWS = [
    ["7", face_pixels(90), "Training"],  # No class 7 in FER2013: unknown label.
    ["x", face_pixels(91), "Training"],  # Emotion not a number: malformed.
    ["3", "1 2 3", "Training"],  # Too few pixels: malformed.
    ["3", face_pixels(92).replace("7", "700", 1), "PublicTest"],  # A pixel > 255: malformed.
    ["3", face_pixels(93), "Extra"],  # Unknown Usage: malformed.
    ["3", face_pixels(94)],  # Two fields: malformed.
]


def ferplus_votes(winner, kind="clear"):
    """Ten votes over the 10 FER+ columns: 'clear' (8 for winner), 'tie' (4 and 4),
    'outliers' (5 for winner, five single votes: a majority once single votes are removed)."""
    votes = [0] * 10
    if kind == "clear":
        votes[winner], votes[(winner + 1) % 8] = 8, 2
    elif kind == "tie":
        votes[winner], votes[(winner + 1) % 8], votes[(winner + 2) % 8] = 4, 4, 2
    elif kind == "outliers":
        votes[winner] = 5
        for k in range(1, 6):
            votes[(winner + k) % 10] = 1
    return votes


def rafdb_release(root, aligned=True):
    """basic/EmoLabel/list_patition_label.txt and its images: 2 train and 1 test face per
    class, and the bad lines users meet."""
    images = os.path.join(root, "basic", "Image", "aligned" if aligned else "original")
    suffix = "_aligned" if aligned else ""
    lines = []
    for label in range(1, 8):
        for split, k in (("train", 0), ("train", 1), ("test", 0)):
            stem = f"{split}_{label:03d}{k}"
            write_jpeg(os.path.join(images, f"{stem}{suffix}.jpg"), (30 * label, 50 * k, 90))
            lines.append(f"{stem}.jpg {label}")
    lines += [
        "train_09999.jpg",  # no label: malformed
        "train_00100.jpg 9",  # no class 9: unknown label
        "train_00101.jpg x",  # malformed
        "other_00001.jpg 3",  # neither train_ nor test_: malformed
        "test_00102.jpg 3",  # no image
        "train_00103.jpg 4",  # undecodable image
    ]
    write_bytes(os.path.join(images, f"train_00103{suffix}.jpg"))
    write_jpeg(os.path.join(images, f"train_00104{suffix}.jpg"), RED)  # listed nowhere
    label_file = os.path.join(root, "basic", "EmoLabel", "list_patition_label.txt")
    os.makedirs(os.path.dirname(label_file), exist_ok=True)
    with open(label_file, "w") as f:
        f.write("\n".join(lines) + "\n")

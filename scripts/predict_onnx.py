r"""Expression, valence and arousal of face images with an exported ONNX model alone.

  python scripts/predict_onnx.py model.onnx photos/ selfie.jpg > predictions.csv

Needs only onnxruntime, numpy and pillow: the model file holds its preprocessing, its input size
and its class names (``python -m affect_jax.export --output=model.onnx``). Each image is
cropped to its centre square and resized to the model's input size (the whole image is taken to
be the face). Prints CSV: path, expression, one probability per class, valence, arousal.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def image_paths(paths: list[str]) -> list[str]:
    """The files named and the images in the folders named (recursively, sorted)."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                found += [
                    os.path.join(root, name)
                    for name in sorted(files)
                    if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                ]
        else:
            found.append(path)
    return found


def load_face(path: str, size: int) -> np.ndarray:
    """uint8 RGB [size, size, 3]: the image's centre square, resized (bilinear)."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        square = image.crop((left, top, left + side, top + side))
        if side != size:
            square = square.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(square, np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an ONNX file written by python -m affect_jax.export")
    parser.add_argument("inputs", nargs="+", help="images and folders of images")
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args(argv)

    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if "class_names" not in meta or "image_size" not in meta:
        print(
            f"{args.model}: no affect-jax metadata (class_names, image_size); export it with "
            "python -m affect_jax.export",
            file=sys.stderr,
        )
        return 1
    class_names = json.loads(meta["class_names"])
    size = int(meta["image_size"])
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(
        ["path", "expression", *(f"prob_{c}" for c in class_names), "valence", "arousal"]
    )
    paths, failed = image_paths(args.inputs), 0
    if not paths:
        print(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(args.inputs)}",
            file=sys.stderr,
        )
        return 1
    for start in range(0, len(paths), args.batch_size):
        batch, faces = [], []
        for path in paths[start : start + args.batch_size]:
            try:
                faces.append(load_face(path, size))
                batch.append(path)
            except OSError as e:
                print(f"{path}: cannot read image: {e}", file=sys.stderr)
                failed += 1
        if not faces:
            continue
        probs, valence_arousal = session.run(
            ["probs", "valence_arousal"], {"images": np.stack(faces)}
        )
        for path, p, (valence, arousal) in zip(batch, probs, valence_arousal, strict=True):
            writer.writerow(
                [
                    path,
                    class_names[int(p.argmax())],
                    *(f"{v:.6f}" for v in p),
                    f"{valence:.6f}",
                    f"{arousal:.6f}",
                ]
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The choices a run offers, each checked against a reference computed here.

``best_mode``, ``backbone_learning_rate``, evaluation's ``--checkpoint=latest``, ``--split=train``
and ``--flip_tta``, evaluation and export without the optimizer state, and prediction's
``--which=latest``, ``--flip_tta``, image and video formats and face boxes grown by
``data.face_margin``. One tiny run trained in this process serves every test: three epochs
ranked by validation loss, lowest best, so the best, the worst and the latest epoch are three
different checkpoints.
"""

import csv
import json
import os
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from affect_jax import checkpointing, evaluate, export, predict, run_dir, sharding, steps, train
from affect_jax.data import pipeline, synthetic
from tests.conftest import REPO, tiny_config

MARGIN = 0.25


def _run_config():
    config = tiny_config(best_metric="loss", best_mode="min", num_epochs=3, learning_rate=3e-3)
    config.data.face_margin = MARGIN  # read by prediction's face crops (synthetic faces have none)
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(config, workdir, validation losses by epoch) of the module's run."""
    config = _run_config()
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(config, workdir)
    losses = [row["val_loss"] for row in run_dir.load_history(workdir)]
    # What the tests below rely on (measured: 2.288, 2.306, 2.296): lowest first, highest second.
    assert len(losses) == 3 and np.argmin(losses) == 0 and np.argmax(losses) == 1, losses
    return config, workdir, losses


def _forward(workdir, config, step):
    """A jitted ``images -> (class probabilities, valence/arousal)`` of checkpoint ``step``,
    through the model's own call in inference mode."""
    mesh = sharding.make_mesh()
    _, graphdef, state = run_dir.restore_checkpoint(workdir, config, mesh, step=step)

    @jax.jit
    def forward(variables, images):
        model = nnx.merge(graphdef, variables["params"], variables["batch_stats"])
        out = model(images, train=False)
        return jax.nn.softmax(out["class_logits"]), out["valence_arousal"]

    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    return lambda images: tuple(np.asarray(x, np.float64) for x in forward(variables, images))


def _two_pass_average(forward, images):
    """The mean of the outputs of the images and of their mirror images (width reversed)."""
    probs, va = forward(images)
    flipped_probs, flipped_va = forward(np.ascontiguousarray(images[:, :, ::-1]))
    return (probs + flipped_probs) / 2, (va + flipped_va) / 2


def _reference_loss(workdir, config, step, pool, flip):
    """The split's loss (mean cross-entropy + MSE, evaluation's loss weights of 1) from
    explicit forward passes over ``pool``'s evaluation batches."""
    forward = _forward(workdir, config, step)
    ce, squared = [], []
    for batch in pipeline.eval_batches(pool, config, config.eval_batch_size):
        keep = batch["mask"] > 0
        probs, va = (_two_pass_average if flip else lambda f, x: f(x))(forward, batch["image"])
        ce.append(-np.log(probs[keep, batch["expression"][keep]]))
        squared.append((va[keep] - batch["valence_arousal"][keep]) ** 2)
    assert config.loss_weights.classification == config.loss_weights.regression == 1
    return float(np.concatenate(ce).mean() + np.concatenate(squared).mean())


# ---------------------------------------------------------------------------------------------
# Checkpoints kept and chosen
# ---------------------------------------------------------------------------------------------


def test_best_mode_min_keeps_and_ranks_the_lowest_metric(tmp_path):
    config = tiny_config(best_metric="loss", best_mode="min", keep_checkpoints=1)
    manager = checkpointing.create_manager(str(tmp_path), config)
    state = {"w": np.zeros(3, np.float32)}
    for epoch, loss in enumerate([0.5, 0.2, 0.4, float("nan"), 0.3], start=1):
        checkpointing.save(manager, epoch, state, {"loss": loss, "accuracy": 0.1 * epoch})
        manager.wait_until_finished()
    # The latest one and the lowest loss; a NaN ranks last, never best.
    assert sorted(manager.all_steps()) == [2, 5]
    assert manager.best_step() == 2
    assert checkpointing.ranked_steps(manager, config, "best") == [2, 5]
    manager.close()


def test_the_run_keeps_its_lowest_validation_loss_as_best(run):
    config, workdir, _ = run
    final = json.load(open(os.path.join(workdir, run_dir.FINAL_METRICS)))
    assert final["best_epoch"] == 1 and final["best_metric"] == "loss"
    # keep_checkpoints=2 latest epochs, and the best one beside them.
    assert config.keep_checkpoints == 2
    assert sorted(os.listdir(run_dir.checkpoints_dir(workdir))) == ["1", "2", "3"]


def test_eval_latest_scores_the_last_epoch_not_the_best(run):
    config, workdir, losses = run
    result = evaluate.evaluate(config, workdir, checkpoint="latest")
    assert result["epoch"] == 3 and result["checkpoint"] == "latest"
    # The last epoch's validation loss as training logged it; the best's is another.
    np.testing.assert_allclose(result["metrics"]["loss"], losses[2], rtol=1e-6)
    assert abs(losses[2] - losses[0]) > 1e-3


def test_eval_split_train_scores_the_training_pool(run):
    config, workdir, _ = run
    splits = pipeline.make_splits(config)
    result = evaluate.evaluate(config, workdir, split="train")
    assert (result["split"], result["epoch"]) == ("train", 1)
    assert result["num_examples"] == len(splits.train) != len(splits.validation)
    assert sum(map(sum, result["metrics"]["confusion_matrix"])) == len(splits.train)
    expected = _reference_loss(workdir, config, 1, splits.train, flip=False)
    np.testing.assert_allclose(result["metrics"]["loss"], expected, rtol=1e-5)


def test_eval_flip_tta_averages_the_image_and_its_mirror_image(run):
    config, workdir, losses = run
    validation = pipeline.make_splits(config).validation
    result = evaluate.evaluate(config, workdir, flip_tta=True)
    assert result["flip_tta"] and result["epoch"] == 1
    expected = _reference_loss(workdir, config, 1, validation, flip=True)
    np.testing.assert_allclose(result["metrics"]["loss"], expected, rtol=1e-5)
    # The mirror images count: the loss moves (measured 4e-4) far beyond the tolerance (2e-5).
    assert abs(expected - losses[0]) > 1e-4


def test_eval_and_export_restore_the_weights_without_the_optimizer_state(run, tmp_path):
    """Scoring and exporting read ``params`` and ``batch_stats`` alone: a copy of the run's
    best checkpoint without its optimizer state scores what training logged for that epoch
    and exports the checkpoint's weights."""
    config, workdir, losses = run
    _, _, state = run_dir.restore_checkpoint(workdir, config, sharding.make_mesh(), step=1)
    copy = str(tmp_path)
    run_dir.save_config(config, copy)
    manager = run_dir.checkpoint_manager(copy, config)
    weights_only = {k: v for k, v in state.items() if k != "opt_state"}
    checkpointing.save(manager, 1, weights_only, {"loss": losses[0]})
    manager.wait_until_finished()
    manager.close()
    result = evaluate.evaluate(config, copy)
    assert result["epoch"] == 1
    np.testing.assert_allclose(result["metrics"]["loss"], losses[0], rtol=1e-6)
    exported = export.load_run(copy)
    assert exported.step == 1
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    jax.tree.map(np.testing.assert_array_equal, exported.variables, variables)


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------


def _keras_adam_updates(config, grads, lr):
    """Keras's Adam updates for a sequence of gradients of one tensor (float64)."""
    b1, b2, eps = config.adam_b1, config.adam_b2, config.adam_epsilon
    m = v = 0.0
    updates = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        updates.append(-lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps))
    return updates


@pytest.mark.parametrize("backbone_lr", [2e-5, -1.0])
def test_backbone_learning_rate_drives_the_backbone_and_learning_rate_the_heads(backbone_lr):
    config = tiny_config(learning_rate=1e-3, backbone_learning_rate=backbone_lr)
    graphdef, tx, state = steps.create_train_state(config, steps.create_initial_model(config))
    params = state["params"]
    rng = np.random.default_rng(0)
    # Gradients over four orders of magnitude: Adam's step is ~lr for the large ones only.
    grads = [
        jax.tree.map(
            lambda p: (rng.normal(size=p.shape) * 10 ** rng.uniform(-7, -3, p.shape)).astype(
                np.float32
            ),
            params,
        )
        for _ in range(2)
    ]
    opt_state, got = state["opt_state"], []
    for g in grads:
        updates, opt_state = tx.update(g, opt_state, params)
        got.append(updates)
    expected_lr = {"backbone": backbone_lr if backbone_lr > 0 else 1e-3, "head": 1e-3}
    paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    grad_leaves = [jax.tree.leaves(g) for g in grads]
    update_leaves = [jax.tree.leaves(u) for u in got]
    seen = set()
    for i, path in enumerate(paths):
        group = "backbone" if path[0].key == "backbone" else "head"
        seen.add(group)
        lr = expected_lr[group]
        reference = _keras_adam_updates(config, [g[i] for g in grad_leaves], lr)
        # float32 round-off: relative, and absolute where a gradient is as small as epsilon.
        for step, want in enumerate(reference):
            np.testing.assert_allclose(
                update_leaves[step][i], want, rtol=2e-5, atol=1e-6 * lr, err_msg=f"{path} {step}"
            )
    assert seen == {"backbone", "head"}


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------


def _write_video(path, fourcc, frames):
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (width, height))
    assert writer.isOpened(), path
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def _read_video(path):
    """Every frame of a video, uint8 RGB (read here, not by affect_jax)."""
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """{path: the uint8 RGB images a reader should get from it (a video: every frame)}:
    .bmp, .webp (lossless), .jpeg, and 5-frame .mp4, .mov (MPEG-4) and .mkv (Motion JPEG)."""
    root = tmp_path_factory.mktemp("media")
    faces = synthetic.draw_faces(8, 40, 8, seed=3)["image"]
    written = {}
    for name, face, options in (
        ("face.bmp", faces[0], {}),
        ("face.webp", faces[1], {"lossless": True}),
        ("face.jpeg", faces[2], {"quality": 95}),
    ):
        Image.fromarray(face).save(root / name, **options)
        written[str(root / name)] = [np.asarray(Image.open(root / name).convert("RGB"))]
    for name, fourcc in (("clip.mp4", "mp4v"), ("clip.mov", "mp4v"), ("clip.mkv", "MJPG")):
        _write_video(root / name, fourcc, [np.pad(f, ((0, 0), (4, 4), (0, 0))) for f in faces[3:]])
        written[str(root / name)] = _read_video(root / name)
        assert len(written[str(root / name)]) == 5
    return written


def test_predict_reads_every_format_with_latest_checkpoint_and_flip_tta(run, media):
    """One CLI call: --which=latest --flip_tta over bmp, webp, jpeg, mp4, mov and mkv; each row
    is the average of two explicit forward passes of epoch 3's model."""
    config, workdir, _ = run
    cmd = [sys.executable, "-m", "affect_jax.predict", f"--workdir={workdir}", "--which=latest"]
    cmd += ["--flip_tta", "--face=none", "--every_n_frames=2", "--format=jsonl", *media]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint 3" in result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    expected_rows = [
        (path, frame)
        for path, frames in media.items()
        for frame in ([None] if len(frames) == 1 else [0, 2, 4])
    ]
    assert [(r["path"], r["frame"], r["status"]) for r in rows] == [
        (*key, "ok") for key in expected_rows
    ]
    size, mode = config.data.image_size, pipeline.preprocessing_mode(config)
    images = np.stack(
        [
            pipeline.preprocess(pipeline.resize_image(media[path][frame or 0], size), mode)
            for path, frame in expected_rows
        ]
    )
    probs, va = _two_pass_average(_forward(workdir, config, 3), images)
    names = [c for c in rows[0] if c.startswith("prob_")]
    np.testing.assert_allclose([[r[c] for c in names] for r in rows], probs, atol=1e-5)
    np.testing.assert_allclose(
        [[r["valence"], r["arousal"]] for r in rows], np.clip(va, -1, 1), atol=1e-5
    )


def test_face_boxes_are_grown_by_the_runs_face_margin_and_clipped(run, tmp_path):
    _, workdir, _ = run
    image = synthetic.draw_faces(1, 48, 8, seed=5)["image"][0][:40]  # 40 rows, 48 columns
    path = tmp_path / "face.png"
    Image.fromarray(image).save(path)
    boxes = tmp_path / "boxes.csv"
    with open(boxes, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "face_x", "face_y", "face_width", "face_height"])
        writer.writerow([path, 10, 8, 20, 16])  # grown by 5 and 4 pixels a side
        writer.writerow([path, 30.5, 2, 16, 12])  # past the right and top edges: clipped
    predictor = predict.Predictor(workdir, batch_size=4)
    assert predictor.face_margin == MARGIN
    rows = predictor.predict_files([str(path)], face="box", boxes=str(boxes))
    # Margin 0.25 of the box's size on each side; x0, y0 rounded down, x1, y1 up.
    expected = [(5, 4, 35, 28), (26, 0, 48, 17)]  # x0, y0, x1, y1; 30.5 - 4 = 26.5 -> 26
    assert [[r[c] for c in predict.FACE_COLUMNS] for r in rows] == [
        [x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in expected
    ]
    crops = [image[y0:y1, x0:x1] for x0, y0, x1, y1 in expected]
    np.testing.assert_allclose(
        [[r[c] for c in predictor.prob_columns] for r in rows],
        predictor.predict(crops)["probs"],
        atol=1e-5,
    )

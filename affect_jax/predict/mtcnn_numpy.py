"""MTCNN (Zhang et al. 2016, "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks") as the ``mtcnn`` 1.0.0 package runs it, in NumPy, with that package's
own weights.

Why by hand: the package's three nets are tf.keras models and its pyramid and patch resizes are
TensorFlow ops (``tf.image.resize(method=AREA)``, ``tf.image.crop_and_resize``), so using it
means importing TensorFlow, which dominates the start-up of a one-photo prediction; and no
maintained TensorFlow-free package ships these weights with this exact pipeline. This module
reads the package's weight files (without importing the package, whose ``__init__`` imports
TensorFlow) and reproduces ``MTCNN.detect_faces`` for one uint8 RGB image with
``output_type="numpy"``, ``box_format="xywh"``, ``fit_to_image=True``,
``limit_boundaries_landmarks=False`` and ``postprocess=True``, step by step, including the
package's quirks (its all-pairs suppression, its patch-box divisors, the float32 rounding its
TensorFlow/NumPy mixes cause, and finding nothing when a pyramid level is too small for PNet).
tests/test_mtcnn_numpy.py checks every piece against the package and TensorFlow.

Rows returned: image index (always 0), x, y, width, height, confidence, the five landmarks' x
(left eye, right eye, nose, mouth left, mouth right) then their five y.
"""

from __future__ import annotations

import importlib.util
import pathlib

import cv2
import joblib
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

MISSING_PACKAGE = (
    "the MTCNN face detector needs the mtcnn package: pip install -c constraints.txt mtcnn lz4 "
    "(or use --detector=lbp)"
)

# The package's defaults for the stages' keyword arguments (mtcnn/stages/*.py).
MIN_SIZE = 12  # PNet's window: the pyramid's first level maps min_face_size onto it.
SCALE_FACTOR = 0.709
THRESHOLD_PNET = 0.6
NMS_PNET1 = 0.5  # Within one pyramid level.
NMS_PNET2 = 0.7  # Across levels.
THRESHOLD_RNET = 0.7
NMS_RNET = 0.7
NMS_ONET = 0.7
# PNet's smallest input side: below it a 'valid' convolution would have no output, which in the
# package is a TensorFlow InvalidArgumentError, i.e. "no faces" for the whole image.
PNET_MIN_INPUT = 11
# RNet and ONet run on patches in chunks, so their im2col buffers stay small however many
# proposals an image has.
PATCH_CHUNK = 256
# Column blocks of the suppression's pairwise overlap matrix (bounds its memory).
NMS_BLOCK = 1024

F32 = np.float32


# ----------------------------------------------------------------------------------------------
# Weights


def package_weights_dir() -> pathlib.Path:
    """The ``mtcnn`` package's weights directory, found without importing the package."""
    # find_spec on a top-level name locates the package but runs none of its code (its
    # __init__ imports TensorFlow).
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(MISSING_PACKAGE)
    # joblib reads the .lz4 files only with the lz4 package installed.
    if importlib.util.find_spec("lz4") is None:
        raise RuntimeError(MISSING_PACKAGE)
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "assets" / "weights"


def _load_net(path: pathlib.Path, layout: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays of one weights file, named in the order ``model.set_weights`` assigns them.

    ``layout`` lists the layers holding weights in the Keras model's attribute order (the order
    of ``model.weights``): "conv..."/"fc..." take a kernel and a bias, "prelu..." one alpha.
    """
    arrays = joblib.load(path)
    net, i = {}, 0
    for name in layout:
        if name.startswith("prelu"):
            net[name] = arrays[i]
            i += 1
        else:
            net[name + "_kernel"], net[name + "_bias"] = arrays[i], arrays[i + 1]
            i += 2
    if i != len(arrays):
        raise ValueError(f"{path}: {len(arrays)} arrays, the layout expects {i}")
    for key, value in net.items():
        value = np.ascontiguousarray(value, F32)
        value.flags.writeable = False  # Shared read-only by every thread's detection.
        net[key] = value
    return net


# The layers holding weights, in each Keras model's attribute order (mtcnn/network/*.py).
PNET_LAYOUT = tuple("conv1 prelu1 conv2 prelu2 conv3 prelu3 conv4_1 conv4_2".split())
RNET_LAYOUT = tuple("conv1 prelu1 conv2 prelu2 conv3 prelu3 fc4 prelu4 fc5_1 fc5_2".split())
ONET_LAYOUT = tuple(
    "conv1 prelu1 conv2 prelu2 conv3 prelu3 conv4 prelu4 fc5 prelu5 fc6_1 fc6_2 fc6_3".split()
)


# ----------------------------------------------------------------------------------------------
# Layers (NHWC float32, as tf.keras computes them)


def conv2d_valid(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Keras Conv2D, stride 1, 'valid' padding: ``x`` [N, H, W, C], ``kernel`` [kh, kw, C, O]."""
    kh, kw, c, o = kernel.shape
    n, h, w, _ = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    if kh == kw == 1:
        return x @ kernel[0, 0] + bias
    # Windows come as [N, ho, wo, C, kh, kw]; ordered (kh, kw, C) they match the HWIO kernel's
    # rows, and the copy (im2col) reads C contiguously. One matmul then does the whole layer.
    windows = sliding_window_view(x, (kh, kw), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)
    columns = windows.reshape(n * ho * wo, kh * kw * c)
    return (columns @ kernel.reshape(kh * kw * c, o)).reshape(n, ho, wo, o) + bias


def prelu(x: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Keras PReLU, max(x, 0) + alpha * min(x, 0), in place on ``x`` (a layer's fresh output);
    ``alpha`` broadcasts over the shared axes ([1, 1, C] for conv maps)."""
    negative = np.minimum(x, 0)
    negative *= alpha
    np.maximum(x, 0, out=x)
    x += negative
    return x


def max_pool(x: np.ndarray, pool: int, stride: int, same: bool) -> np.ndarray:
    """Keras MaxPooling2D on [N, H, W, C], 'same' (TensorFlow's padding) or 'valid'."""
    if same:
        # TensorFlow: out = ceil(in / stride), total padding max((out - 1) * stride + pool - in,
        # 0), the smaller half before. For pool 3, stride 2 that pads one at the end of an even
        # side but one at each end of an odd one. Padding never wins a max, hence -inf.
        pads = []
        for size in x.shape[1:3]:
            out = -(-size // stride)
            total = max((out - 1) * stride + pool - size, 0)
            pads.append((total // 2, total - total // 2))
        if any(p for pair in pads for p in pair):
            x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=-np.inf)
    h_out = (x.shape[1] - pool) // stride + 1
    w_out = (x.shape[2] - pool) // stride + 1
    # The max over the pool's offsets, each a strided view of the whole map (a loop over the
    # pool x pool offsets, not over pixels).
    h_span, w_span = stride * (h_out - 1) + 1, stride * (w_out - 1) + 1
    pooled = None
    for i in range(pool):
        for j in range(pool):
            view = x[:, i : i + h_span : stride, j : j + w_span : stride]
            pooled = view.copy() if pooled is None else np.maximum(pooled, view, out=pooled)
    return pooled


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (Keras's activation="softmax")."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def flatten_permuted(x: np.ndarray) -> np.ndarray:
    """Keras Permute((2, 1, 3)) then Flatten: [N, H, W, C] to [N, W * H * C] in (w, h, c) order,
    the order the package's dense weights expect (a plain NHWC flatten would scramble them)."""
    return x.transpose(0, 2, 1, 3).reshape(x.shape[0], -1)


def _conv_block(net: dict, x: np.ndarray, suffix: str) -> np.ndarray:
    """conv{suffix} then prelu{suffix}."""
    x = conv2d_valid(x, net[f"conv{suffix}_kernel"], net[f"conv{suffix}_bias"])
    return prelu(x, net[f"prelu{suffix}"])


def pnet(net: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PNet on [N, H, W, 3] (H, W >= 11): box regression [N, h, w, 4], face softmax [N, h, w, 2]."""
    x = max_pool(_conv_block(net, x, "1"), 2, 2, same=True)
    x = _conv_block(net, x, "2")
    x = _conv_block(net, x, "3")
    reg = conv2d_valid(x, net["conv4_1_kernel"], net["conv4_1_bias"])
    prob = softmax(conv2d_valid(x, net["conv4_2_kernel"], net["conv4_2_bias"]))
    return reg, prob


def rnet(net: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RNet on [N, 24, 24, 3]: box regression [N, 4], face softmax [N, 2]."""
    x = max_pool(_conv_block(net, x, "1"), 3, 2, same=True)
    x = max_pool(_conv_block(net, x, "2"), 3, 2, same=False)
    x = flatten_permuted(_conv_block(net, x, "3"))
    x = prelu(x @ net["fc4_kernel"] + net["fc4_bias"], net["prelu4"])
    reg = x @ net["fc5_1_kernel"] + net["fc5_1_bias"]
    prob = softmax(x @ net["fc5_2_kernel"] + net["fc5_2_bias"])
    return reg, prob


def onet(net: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ONet on [N, 48, 48, 3]: box regression [N, 4], landmarks [N, 10] (5 x then 5 y, in box
    units), face softmax [N, 2]."""
    x = max_pool(_conv_block(net, x, "1"), 3, 2, same=True)
    x = max_pool(_conv_block(net, x, "2"), 3, 2, same=False)
    x = max_pool(_conv_block(net, x, "3"), 2, 2, same=True)
    x = flatten_permuted(_conv_block(net, x, "4"))
    x = prelu(x @ net["fc5_kernel"] + net["fc5_bias"], net["prelu5"])
    reg = x @ net["fc6_1_kernel"] + net["fc6_1_bias"]
    landmarks = x @ net["fc6_2_kernel"] + net["fc6_2_bias"]
    prob = softmax(x @ net["fc6_3_kernel"] + net["fc6_3_bias"])
    return reg, landmarks, prob


def _in_chunks(fn, patches: np.ndarray) -> tuple[np.ndarray, ...]:
    """``fn`` on ``patches`` PATCH_CHUNK at a time, its outputs concatenated."""
    parts = [fn(patches[i : i + PATCH_CHUNK]) for i in range(0, len(patches), PATCH_CHUNK)]
    return tuple(np.concatenate(outputs) for outputs in zip(*parts, strict=True))


# ----------------------------------------------------------------------------------------------
# TensorFlow's image ops


def _area_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.float32]:
    """TensorFlow ResizeArea (align_corners=False) along one axis as an [out, in] matrix of
    coverage weights, and that axis's scale (in / out).

    Output pixel o covers the input interval [o * scale, (o + 1) * scale); each input pixel
    weighs the length of its overlap. The kernel computes in float32, so this does too: the
    interval ends decide which pixels count. Indices past the image (float rounding can push
    ceil(end) one past it) are clamped onto the last pixel, as the kernel's Bound() does.
    """
    scale = F32(in_size) / F32(out_size)
    o = np.arange(out_size)
    start_f = o.astype(F32) * scale
    end_f = (o + 1).astype(F32) * scale
    start = np.floor(start_f).astype(np.int64)
    end = np.ceil(end_f).astype(np.int64)
    weights = np.zeros((out_size, in_size), F32)
    for j in range(int((end - start).max())):  # The few input pixels one output pixel spans.
        i = start + j
        valid = i < end
        i_f = i.astype(F32)
        one = F32(1.0)
        past_end = i_f + one > end_f
        weight = np.where(
            i_f < start_f,
            np.where(past_end, scale, (i_f + one) - start_f),
            np.where(past_end, end_f - i_f, one),
        ).astype(F32)
        np.add.at(weights, (o[valid], np.clip(i[valid], 0, in_size - 1)), weight[valid])
    return weights, scale


def resize_area(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``tf.image.resize(image, (height, width), method="area")`` for one [H, W, C] image,
    float32.

    Downscaling, OpenCV's INTER_AREA averages the same pixel areas with the same weights, in a
    fraction of the time (within 1e-4 of TensorFlow, tests/test_mtcnn_numpy.py); otherwise
    ``Wy @ image @ Wx^T`` per channel, times TensorFlow's 1 / (scale_y * scale_x).
    """
    h, w, _ = image.shape
    image = image.astype(F32, copy=False)
    if height <= h and width <= w:
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    wy, scale_y = _area_weights(h, height)
    wx, scale_x = _area_weights(w, width)
    # The kernel's normaliser: a float32 product inverted in double, stored as float32.
    norm = F32(1.0 / float(F32(scale_y * scale_x)))
    # Channels first, so each product is one large matmul per channel.
    planes = np.ascontiguousarray(image.transpose(2, 0, 1))
    out = (wy @ planes @ wx.T) * norm  # [C, height, width]
    return np.ascontiguousarray(out.transpose(1, 2, 0))


def crop_and_resize(image: np.ndarray, boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``tf.image.crop_and_resize(image[None], boxes, zeros, size)`` (bilinear, extrapolation 0)
    for one [H, W, C] image and normalised boxes [N, 4] (y1, x1, y2, x2): [N, h, w, C] float32.

    TensorFlow's sampling, in float32: row i of a crop reads the image at
    y = y1 * (H - 1) + i * (y2 - y1) * (H - 1) / (h - 1), likewise for x; a sample outside
    [0, H - 1] x [0, W - 1] is 0.
    """
    img = image.astype(F32, copy=False)
    h_img, w_img, _ = img.shape
    crop_h, crop_w = size
    boxes = np.asarray(boxes, F32)
    y1, x1, y2, x2 = (boxes[:, k : k + 1] for k in range(4))
    hm1, wm1 = F32(h_img - 1), F32(w_img - 1)
    # crop_h, crop_w > 1 here (24 and 48), the kernel's general branch.
    y_step = (y2 - y1) * hm1 / F32(crop_h - 1)
    x_step = (x2 - x1) * wm1 / F32(crop_w - 1)
    in_y = y1 * hm1 + np.arange(crop_h, dtype=F32) * y_step  # [N, h]
    in_x = x1 * wm1 + np.arange(crop_w, dtype=F32) * x_step  # [N, w]
    inside = ((in_y >= 0) & (in_y <= hm1))[:, :, None] & ((in_x >= 0) & (in_x <= wm1))[:, None]
    # Outside samples read a clamped pixel and are zeroed afterwards.
    in_y, in_x = np.clip(in_y, 0, hm1), np.clip(in_x, 0, wm1)
    top, bottom = np.floor(in_y).astype(np.intp), np.ceil(in_y).astype(np.intp)
    left, right = np.floor(in_x).astype(np.intp), np.ceil(in_x).astype(np.intp)
    y_lerp = (in_y - top.astype(F32))[:, :, None, None]
    x_lerp = (in_x - left.astype(F32))[:, None, :, None]
    t, b = top[:, :, None], bottom[:, :, None]
    lf, rt = left[:, None, :], right[:, None, :]
    top_row = img[t, lf] + (img[t, rt] - img[t, lf]) * x_lerp
    bottom_row = img[b, lf] + (img[b, rt] - img[b, lf]) * x_lerp
    crops = top_row + (bottom_row - top_row) * y_lerp
    return np.where(inside[..., None], crops, F32(0))


# ----------------------------------------------------------------------------------------------
# The package's image and box utilities (mtcnn/utils/{images,bboxes,landmarks}.py), for one
# image. Boxes are rows [image index, x1, y1, x2, y2, confidence(, 5 landmark x, 5 landmark y)].


def normalize_image(image: np.ndarray) -> np.ndarray:
    """``normalize_images``: [0, 255] to about [-1, 1] (exact in float32 for uint8 input)."""
    return (image.astype(F32) - F32(127.5)) / F32(128)


def build_scale_pyramid(width: int, height: int, min_face_size: int) -> np.ndarray:
    """``build_scale_pyramid``: the scales at which PNet's 12-pixel window sees faces from
    ``min_face_size`` up (evaluated with the package's own expressions, so bit for bit)."""
    min_dim = min(width, height)
    scales_count = round(-((np.log(min_dim / MIN_SIZE) / np.log(SCALE_FACTOR)) + 1))
    m = MIN_SIZE / min_face_size
    return m * SCALE_FACTOR ** np.arange(scales_count)


def scaled_shape(height: int, width: int, scale: float) -> tuple[int, int]:
    """``scale_images``'s new (height, width): ``shape * scale`` as float, which
    ``tf.image.resize`` converts to int32 by truncation (not rounding)."""
    new = np.asarray([height, width]) * scale
    return int(new[0]), int(new[1])


def sort_by_scores_desc(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``sort_by_scores(..., ascending=False)``: np.argsort's (unstable) order, reversed, so ties
    come out as the package's do."""
    return boxes[np.argsort(scores)[::-1]]


def generate_bounding_box(reg: np.ndarray, prob: np.ndarray, threshold: float) -> np.ndarray:
    """``generate_bounding_box`` for one PNet map: a box per cell whose face probability exceeds
    ``threshold``, window (2x + 1, 2y + 1)-(2x + 12, 2y + 12) moved by the regression times 11,
    sorted by confidence, highest first. ``reg`` [h, w, 4], ``prob`` [h, w, 2], float32."""
    confidence = prob[:, :, 1]
    ys, xs = np.where(confidence > threshold)
    # The package multiplies the float32 regression by int64 sizes: float64 products.
    dx1, dy1, dx2, dy2 = reg[ys, xs].T.astype(np.float64)
    size = 12 - 1  # The package's window width: bottom-right (12) minus top-left (1).
    boxes = np.stack(
        [
            np.zeros(len(ys)),
            2 * xs + 1 + dx1 * size,
            2 * ys + 1 + dy1 * size,
            2 * xs + 12 + dx2 * size,
            2 * ys + 12 + dy2 * size,
            confidence[ys, xs],
        ],
        axis=0,
    ).T.astype(np.float64)
    return sort_by_scores_desc(boxes, boxes[:, -1])


def _overlaps(boxes: np.ndarray, others: np.ndarray, method: str) -> np.ndarray:
    """``iou``'s matrix between ``boxes`` [n, 4] and ``others`` [m, 4] (x1, y1, x2, y2): [n, m].
    'union' divides the intersection by the union, 'min' by the smaller area; areas have no
    +1 and a 0/0 (degenerate boxes) is NaN, which suppresses nothing."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_o = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    a, b = boxes[:, None], others[None]
    x_extent = np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]))
    y_extent = np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]))
    inter = x_extent * y_extent
    with np.errstate(divide="ignore", invalid="ignore"):
        if method == "union":
            return inter / (area[:, None] + area_o[None, :] - inter)
        return inter / np.minimum(area[:, None], area_o[None, :])


def smart_nms(boxes: np.ndarray, threshold: float, method: str, initial_sort: bool) -> np.ndarray:
    """``smart_nms_from_bboxes`` for one image's boxes.

    Not greedy NMS: a box goes if ANY box before it (in confidence order) overlaps it by more
    than ``threshold``, even one that was itself suppressed. Computed in column blocks of the
    package's pairwise matrix (same elements, bounded memory).
    """
    if initial_sort:
        boxes = sort_by_scores_desc(boxes, boxes[:, 5])
    n = len(boxes)
    coords = boxes[:, 1:5]
    keep = np.ones(n, bool)
    for j0 in range(0, n, NMS_BLOCK):
        j1 = min(j0 + NMS_BLOCK, n)
        overlap = _overlaps(coords[:j1], coords[j0:j1], method)  # [i < j1, j in block]
        earlier = np.arange(j1)[:, None] < np.arange(j0, j1)[None, :]
        keep[j0:j1] = ~((overlap > threshold) & earlier).any(axis=0)
    return boxes[keep]


def resize_to_square(boxes: np.ndarray) -> np.ndarray:
    """``resize_to_square``: each box grown on its shorter side to a square about its centre."""
    boxes = boxes.copy()
    h = boxes[:, 4] - boxes[:, 2]
    w = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    boxes[:, 1] = boxes[:, 1] + w * 0.5 - side * 0.5
    boxes[:, 2] = boxes[:, 2] + h * 0.5 - side * 0.5
    boxes[:, 3] = boxes[:, 1] + side
    boxes[:, 4] = boxes[:, 2] + side
    return boxes


def adjust_bboxes(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``adjust_bboxes``: corners moved by the regression times the box's size (+1 px).

    In the package the offsets are a float32 tf.Tensor, so ``offsets * sizes`` and then the
    ``+=`` into the float64 array both run in TensorFlow, in float32: the refined corners are
    float32-rounded. Reproduced here.
    """
    boxes = boxes.copy()
    w = boxes[:, 3] - boxes[:, 1] + 1
    h = boxes[:, 4] - boxes[:, 2] + 1
    sizes = np.stack([w, h, w, h], axis=-1).astype(F32)
    boxes[:, 1:5] = boxes[:, 1:5].astype(F32) + offsets.astype(F32) * sizes
    return boxes


def adjust_landmarks(landmarks: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """``adjust_landmarks``: ONet's landmarks (box units) to image pixels, ``w * l + x1 - 1``
    with w = x2 - x1 + 1; computed in float64 and stored into the float32 output array, as the
    package does."""
    out = np.array(landmarks, F32)
    w = boxes[:, 3:4] - boxes[:, 1:2] + 1
    h = boxes[:, 4:5] - boxes[:, 2:3] + 1
    out[:, 0:5] = w * out[:, 0:5] + boxes[:, 1:2] - 1
    out[:, 5:10] = h * out[:, 5:10] + boxes[:, 2:3] - 1
    return out


def extract_patches(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """``extract_patches``: each box's patch of the normalised image at ``size`` x ``size``.

    The package normalises y by the image height and x by its width (H and W, where
    crop_and_resize's inverse multiplies by H - 1 and W - 1), so each patch is sampled from the
    box scaled by (H - 1) / H about the image origin. Reproduced as is.
    """
    h, w, _ = image.shape
    normalised = boxes[:, [2, 1, 4, 3]] / np.asarray([[h, w, h, w]])
    return crop_and_resize(image, normalised, (size, size))


def limit_bboxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """``limit_bboxes(..., limit_landmarks=False)``: corners clipped to [0, W - 1] x [0, H - 1]
    (landmarks may stay outside)."""
    boxes = boxes.copy()
    boxes[:, [1, 3]] = np.minimum(np.maximum(boxes[:, [1, 3]], 0), width - 1)
    boxes[:, [2, 4]] = np.minimum(np.maximum(boxes[:, [2, 4]], 0), height - 1)
    return boxes


def empty_result() -> np.ndarray:
    """No faces: what the package returns from its InvalidArgumentError branch."""
    return np.empty((0, 16))


# ----------------------------------------------------------------------------------------------


class Mtcnn:
    """The MTCNN face detector of the ``mtcnn`` package, without TensorFlow.

    Weights are read once here; ``detect_faces`` keeps no state, so one instance serves any
    number of threads.
    """

    def __init__(self):
        directory = package_weights_dir()
        self._pnet = _load_net(directory / "pnet.lz4", PNET_LAYOUT)
        self._rnet = _load_net(directory / "rnet.lz4", RNET_LAYOUT)
        self._onet = _load_net(directory / "onet.lz4", ONET_LAYOUT)

    def detect_faces(
        self, image: np.ndarray, min_face_size: int = 20, threshold_onet: float = 0.8
    ) -> np.ndarray:
        """Faces in a uint8 RGB image [H, W, 3], as
        ``mtcnn.MTCNN().detect_faces(image, output_type="numpy", min_face_size=...,
        threshold_onet=...)`` returns them: float rows [0, x, y, width, height, confidence,
        5 landmark x, 5 landmark y], boxes clipped to the image; [0, 16] when none."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
        height, width = image.shape[:2]
        normalized = normalize_image(image)
        boxes = self._stage_pnet(normalized, min_face_size)
        if boxes is None or len(boxes) == 0:
            # The package: RNet on no proposals (or PNet on a too-small level) raises
            # InvalidArgumentError, caught as "no faces".
            return empty_result()
        boxes = self._stage_rnet(normalized, boxes)
        if len(boxes) == 0:  # Likewise ONet on no boxes.
            return empty_result()
        boxes = self._stage_onet(normalized, boxes, threshold_onet)
        if len(boxes) == 0:
            # The package returns [0, 6] here (its NMS's empty shape); keep one shape.
            return empty_result()
        # fix_bboxes_offsets subtracts the batch padding: none for one image.
        boxes = limit_bboxes(boxes, height, width)
        boxes[:, 3] -= boxes[:, 1]  # box_format="xywh"
        boxes[:, 4] -= boxes[:, 2]
        return boxes

    def _stage_pnet(self, normalized: np.ndarray, min_face_size: int) -> np.ndarray | None:
        """StagePNet: proposals over the scale pyramid, squared; None when a level is too small
        for PNet (the package then finds nothing at all)."""
        height, width = normalized.shape[:2]
        scales = build_scale_pyramid(width, height, min_face_size)
        shapes = [scaled_shape(height, width, s) for s in scales]
        if any(min(shape) < PNET_MIN_INPUT for shape in shapes):
            return None
        per_scale = []
        for scale, (h, w) in zip(scales, shapes, strict=True):
            reg, prob = pnet(self._pnet, resize_area(normalized, h, w)[None])
            boxes = generate_bounding_box(reg[0], prob[0], THRESHOLD_PNET)
            boxes[:, 1:5] = boxes[:, 1:5] / scale  # upscale_bboxes: back to image pixels.
            per_scale.append(smart_nms(boxes, NMS_PNET1, "union", initial_sort=False))
        boxes = np.concatenate(per_scale, axis=0) if per_scale else np.empty((0, 6))
        boxes = smart_nms(boxes, NMS_PNET2, "union", initial_sort=True)
        return resize_to_square(boxes)

    def _stage_rnet(self, normalized: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """StageRNet: proposals rescored and refined on 24x24 patches, filtered, squared."""
        patches = extract_patches(normalized, boxes, 24)
        offsets, scores = _in_chunks(lambda p: rnet(self._rnet, p), patches)
        boxes = boxes.copy()
        boxes[:, -1] = scores[:, -1]  # replace_confidence
        boxes = adjust_bboxes(boxes, offsets)
        boxes = boxes[boxes[:, -1] > THRESHOLD_RNET]  # pick_matches
        boxes = smart_nms(boxes, NMS_RNET, "union", initial_sort=True)
        return resize_to_square(boxes)

    def _stage_onet(
        self, normalized: np.ndarray, boxes: np.ndarray, threshold: float
    ) -> np.ndarray:
        """StageONet: boxes rescored and refined on 48x48 patches, with landmarks, filtered."""
        patches = extract_patches(normalized, boxes, 48)
        offsets, landmarks, scores = _in_chunks(lambda p: onet(self._onet, p), patches)
        # Landmarks are placed in the boxes ONet saw, before their refinement.
        landmarks = adjust_landmarks(landmarks, boxes)
        boxes = boxes.copy()
        boxes[:, -1] = scores[:, -1]
        boxes = adjust_bboxes(boxes, offsets)
        boxes = np.concatenate([boxes, landmarks], axis=-1)
        boxes = boxes[boxes[:, 5] > threshold]
        return smart_nms(boxes, NMS_ONET, "min", initial_sort=True)

"""Synthetic detection data written as a VOC-format folder.

Four object classes that differ in shape (a colour alone never tells them apart): disc, square,
triangle and cross. Each image has a textured, noisy background and one to several objects of varied
size, aspect and colour that may partly overlap. Objects cast shadows, half of them are painted in two
colours, and the finished image is slightly blurred: segmentation then finds parts of objects, objects
merged with their shadows and boxes that bleed past soft edges, as it does on photographs, so that
proposals are not all exact. Objects that are small or mostly hidden by later objects are marked
difficult, as VOC does. Everything is drawn from one seed, so a seed is a dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from rcnn_bench.datasets.voc import Annotation, write_annotation
from tqdm import tqdm

__all__ = ["SYNTHETIC_CLASSES", "SyntheticConfig", "draw_images", "generate"]

SYNTHETIC_CLASSES = ("disc", "square", "triangle", "cross")


@dataclass(frozen=True)
class SyntheticConfig:
    """How a synthetic folder is drawn."""

    seed: int = 0  # the whole folder follows from it
    train_images: int = 120  # images in the "trainval" split
    test_images: int = 60  # images in the "test" split
    min_size: tuple[int, int] = (144, 192)  # smallest (H, W) of an image
    max_size: tuple[int, int] = (192, 256)  # largest (H, W) of an image
    max_objects: int = 4  # objects per image: 1..max_objects
    min_side: int = 12  # smallest object side in pixels
    max_side_fraction: float = 0.5  # largest object side, as a fraction of the shorter image side
    difficult_side: int = 18  # objects whose shorter side is below this are difficult
    difficult_visible: float = 0.55  # ... and objects with less than this fraction visible
    max_overlap_iou: float = 0.35  # objects never overlap more than this
    shadow: float = 0.55  # how much each object's cast shadow darkens the background (0: none)
    two_tone: float = 0.5  # share of objects painted in two colours, which segment as two parts
    blur_sigma: float = 1.2  # Gaussian blur of the finished image, in pixels (0: sharp edges)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-frequency colour noise, a few stripes or blobs, and per-pixel noise: float32 (H, W, 3)."""
    coarse = rng.uniform(40, 215, size=(rng.integers(3, 7), rng.integers(3, 7), 3)).astype(
        np.float32
    )
    image = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(rng.integers(1, 4)):
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 30)
        phase = (np.cos(angle) * xx + np.sin(angle) * yy) * (2 * np.pi / period)
        image += (rng.uniform(8, 25) * np.sin(phase))[..., None] * rng.uniform(0.3, 1.0, size=3)
    image += rng.normal(0, rng.uniform(6, 16), size=image.shape).astype(np.float32)
    return image


def _shape_mask(rng: np.random.Generator, label: int, bw: int, bh: int) -> np.ndarray:
    """uint8 (bh, bw) mask of one object that fills its box: 1 inside the shape."""
    mask = np.zeros((bh, bw), np.uint8)
    name = SYNTHETIC_CLASSES[label - 1]
    if name == "disc":
        cv2.ellipse(mask, (((bw - 1) / 2, (bh - 1) / 2), (bw, bh), 0), 1, -1)
    elif name == "square":
        mask[:, :] = 1
    elif name == "triangle":
        apex = rng.uniform(0.3, 0.7) * (bw - 1)
        pts = np.array([[apex, 0], [0, bh - 1], [bw - 1, bh - 1]], np.float32)
        cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, shift=4)
    else:  # cross: a vertical and a horizontal bar
        t = rng.uniform(0.25, 0.4)
        mask[:, int(bw * (0.5 - t / 2)) : int(np.ceil(bw * (0.5 + t / 2)))] = 1
        mask[int(bh * (0.5 - t / 2)) : int(np.ceil(bh * (0.5 + t / 2))), :] = 1
    return mask


def _cast_shadow(
    image: np.ndarray,
    mask: np.ndarray,
    x1: int,
    y1: int,
    rng: np.random.Generator,
    strength: float,
) -> None:
    """Darken the object's silhouette shifted down and to the right (a light from the upper left).

    The shadow is not part of the object, so its box leaves it out; segmentation often merges the two,
    which gives proposals that overshoot the object the way real scenes do and that box regression
    learns to pull in.
    """
    if strength <= 0:
        return
    bh, bw = mask.shape
    dx = round(bw * rng.uniform(0.1, 0.25))
    dy = round(bh * rng.uniform(0.1, 0.25))
    h, w = image.shape[:2]
    sx2, sy2 = min(x1 + dx + bw, w), min(y1 + dy + bh, h)
    if sx2 <= x1 + dx or sy2 <= y1 + dy:
        return
    region = image[y1 + dy : sy2, x1 + dx : sx2]
    region[mask[: sy2 - y1 - dy, : sx2 - x1 - dx]] *= 1.0 - strength


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _draw_image(
    rng: np.random.Generator, image_id: str, cfg: SyntheticConfig
) -> tuple[np.ndarray, Annotation]:
    h = int(rng.integers(cfg.min_size[0], cfg.max_size[0] + 1))
    w = int(rng.integers(cfg.min_size[1], cfg.max_size[1] + 1))
    image = _background(rng, h, w)
    owner = np.full((h, w), -1, np.int32)  # which object shows at each pixel
    boxes, labels, areas = [], [], []
    max_side = int(cfg.max_side_fraction * min(h, w))
    for _ in range(int(rng.integers(1, cfg.max_objects + 1))):
        for _attempt in range(20):
            side = float(np.exp(rng.uniform(np.log(cfg.min_side), np.log(max_side))))
            aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
            bw = int(np.clip(round(side * np.sqrt(aspect)), cfg.min_side, w - 1))
            bh = int(np.clip(round(side / np.sqrt(aspect)), cfg.min_side, h - 1))
            x1, y1 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            box = np.array([x1, y1, x1 + bw, y1 + bh], np.float32)
            if all(_iou(box, other) <= cfg.max_overlap_iou for other in boxes):
                break
        else:
            continue
        label = int(rng.integers(1, len(SYNTHETIC_CLASSES) + 1))
        mask = _shape_mask(rng, label, bw, bh).astype(bool)
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        _cast_shadow(image, mask, x1, y1, rng, cfg.shadow)
        shade = np.linspace(-25, 25, bh, dtype=np.float32)[:, None, None] * rng.uniform(-1, 1)
        patch = image[y1 : y1 + bh, x1 : x1 + bw]
        paint = np.broadcast_to(colour, (bh, bw, 3)).copy()
        if rng.uniform() < cfg.two_tone:  # a second colour on one side of a random cut: parts
            if rng.uniform() < 0.5:
                paint[:, int(bw * rng.uniform(0.35, 0.65)) :] = rng.uniform(0, 255, size=3)
            else:
                paint[int(bh * rng.uniform(0.35, 0.65)) :, :] = rng.uniform(0, 255, size=3)
        patch[mask] = (paint + shade + rng.normal(0, 8, size=(bh, bw, 3)))[mask]
        owner[y1 : y1 + bh, x1 : x1 + bw][mask] = len(boxes)
        boxes.append(box)
        labels.append(label)
        areas.append(int(mask.sum()))
    visible = np.bincount(owner[owner >= 0], minlength=len(boxes))
    boxes_arr = np.asarray(boxes, np.float32).reshape(-1, 4)
    short = np.minimum(boxes_arr[:, 2] - boxes_arr[:, 0], boxes_arr[:, 3] - boxes_arr[:, 1])
    difficult = (short < cfg.difficult_side) | (
        visible / np.maximum(np.asarray(areas), 1) < cfg.difficult_visible
    )
    if cfg.blur_sigma > 0:  # lens blur: edges spread over a pixel or two, as in photographs
        image = cv2.GaussianBlur(image, (0, 0), cfg.blur_sigma)
    pixels = np.clip(image, 0, 255).astype(np.uint8)
    return pixels, Annotation(
        image_id=image_id,
        size=(h, w),
        boxes=boxes_arr,
        labels=np.asarray(labels, np.int64),
        difficult=difficult.astype(bool),
    )


def draw_images(
    count: int, seed: int | list[int], cfg: SyntheticConfig
) -> list[tuple[np.ndarray, Annotation]]:
    """``count`` images drawn as ``generate`` draws a split, from ``seed`` alone, kept in memory: the
    pixels (uint8 (H, W, 3), RGB) and the annotation of each (image ids "pretrain_00000", ...)."""
    rng = np.random.default_rng(seed)
    return [_draw_image(rng, f"pretrain_{i:05d}", cfg) for i in range(count)]


def generate(out: str | Path, cfg: SyntheticConfig) -> dict[str, list[Annotation]]:
    """Write a VOC-format folder at ``out`` with "trainval" and "test" splits.

    Args:
        out: the folder to create (its parent is created too); files already there are overwritten.
        cfg: what to draw.

    Returns:
        dict split -> list[Annotation], exactly what was written.
    """
    out = Path(out)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("\n".join(SYNTHETIC_CLASSES) + "\n")
    rng = np.random.default_rng(cfg.seed)
    written: dict[str, list[Annotation]] = {}
    for split, count in (("trainval", cfg.train_images), ("test", cfg.test_images)):
        anns = []
        for i in tqdm(range(count), desc=f"synthetic {split}", unit="img", disable=None, delay=1.0):
            image_id = f"{split}_{i:05d}"
            pixels, ann = _draw_image(rng, image_id, cfg)
            cv2.imwrite(
                str(out / "JPEGImages" / f"{image_id}.jpg"),
                cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, 95],
            )
            write_annotation(out / "Annotations" / f"{image_id}.xml", ann, SYNTHETIC_CLASSES)
            anns.append(ann)
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text(
            "".join(f"{a.image_id}\n" for a in anns)
        )
        written[split] = anns
    return written

"""Selective-search proposals, computed once per split and shared by every detector that takes
proposals from outside (R-CNN, Fast R-CNN, SPPnet; Faster R-CNN makes its own).

Each image is shrunk so that its longer side is at most ``resize_max_side``, segmented by OpenCV
contrib's selective search (fast or quality mode), and the boxes are mapped back to the original
pixels; boxes with a side under ``min_side`` and duplicates are dropped, and at most
``max_proposals`` are kept in selective search's own order. Images are processed in worker processes,
of this machine or of a Dask cluster (``ProposalConfig.executor``, pipelines.executors); the result is
cached on disk, keyed by the dataset, the split and the parameters (not by where they were computed),
and the cache records the image ids it was computed for.

Selective search orders its regions by a random rank drawn from the C library's ``rand()``
(opencv_contrib, selectivesearchsegmentation.cpp). :func:`selective_search` seeds ``srand`` from
``ProposalConfig.seed`` and the image id right before segmenting, so the proposals of an image do not
depend on which process or machine computed it or on what that process computed before.

Worker processes end with their parent, even one killed outright (Linux), and Ctrl-C stops them;
whatever fails in a worker comes back as one DatasetError line that names the image file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import json
import os
import sys
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from rcnn_bench.datasets.voc import DatasetError, VOCDataset, read_image
from rcnn_bench.pipelines.parts.boxes import box_iou, clip_boxes, min_side_keep, unique_boxes
from rcnn_bench.pipelines.runtime.executors import EXECUTORS, WorkerLostError, map_tasks

__all__ = [
    "DamagedProposalCacheError",
    "ProposalCacheError",
    "ProposalConfig",
    "ProposalSet",
    "image_seed",
    "load_or_compute",
    "selective_search",
    "time_search",
]

CACHE_VERSION = 2  # 2: proposals are seeded (ProposalConfig.seed); version 1 ones were not
# ProposalConfig's fields that say where the proposals are computed, not what they are: left out of
# the cache key, so that adding them kept version 2's keys.
_NOT_IN_KEY = ("executor", "scheduler")

# rand() is global to the process: one selective search at a time per process (see
# selective_search), should a Dask worker run several threads.
_SRAND_LOCK = threading.Lock()


class ProposalCacheError(ValueError):
    """A proposal cache that does not belong to the split it was asked for."""


class DamagedProposalCacheError(ProposalCacheError):
    """A proposal cache file that cannot be read back (truncated, not an .npz, missing arrays)."""


@dataclass(frozen=True)
class ProposalConfig:
    """Selective-search settings; every field but ``executor`` and ``scheduler`` is part of the
    cache key."""

    mode: str = "fast"  # "fast" or "quality" (cv2.ximgproc's two strategies)
    resize_max_side: int = 500  # shrink images so the longer side is at most this before segmenting
    min_side: float = 4.0  # drop boxes with a side under this many pixels (original image)
    max_proposals: int = 2000  # keep at most this many per image, in selective search's order
    seed: int = 0  # with the image id, seeds the random rank that orders selective search's boxes
    executor: str = "local"  # "local": this machine's processes; "dask": a dask.distributed cluster
    scheduler: str | None = None  # dask: "tcp://host:8786"; None: a LocalCluster on this machine

    def __post_init__(self):
        if self.mode not in ("fast", "quality"):
            raise ValueError(f"proposals.mode must be 'fast' or 'quality', got {self.mode!r}")
        if self.max_proposals < 1 or self.resize_max_side < 16:
            raise ValueError("proposals.max_proposals must be >= 1 and resize_max_side >= 16")
        if self.executor not in EXECUTORS:
            raise ValueError(f"proposals.executor must be 'local' or 'dask', got {self.executor!r}")
        if self.scheduler is not None and self.executor != "dask":
            raise ValueError(
                f"proposals.scheduler ({self.scheduler!r}) is for executor 'dask'; "
                "set proposals.executor: dask or drop the scheduler"
            )


@dataclass
class ProposalSet:
    """Proposals of one split.

    Attributes:
        image_ids: the split's ids, in order.
        boxes: list of float32 (Ri, 4) xyxy boxes in original image pixels.
        seconds: float64 (N,) time selective search took on each image (decoding not included).
    """

    image_ids: list[str]
    boxes: list[np.ndarray]
    seconds: np.ndarray
    # read from the cache: ``seconds`` were then measured by the run that made it
    from_cache: bool = False

    def images_at(self, cap: int) -> int:
        """How many images have ``cap`` proposals (or more): those the cap (max_proposals) cut, and
        any whose selective search found exactly ``cap`` boxes."""
        return sum(len(b) >= cap for b in self.boxes)

    def stats(self, dataset: VOCDataset) -> dict[str, float]:
        """Mean proposals and seconds per image, and recall of non-difficult ground truth at IoU 0.5
        and 0.7 (a box is recalled when some proposal overlaps it that much)."""
        hits = {0.5: 0, 0.7: 0}
        total = 0
        for ann, props in zip(dataset.annotations, self.boxes, strict=True):
            gt = ann.boxes[~ann.difficult]
            total += len(gt)
            if len(gt) == 0 or len(props) == 0:
                continue
            best = box_iou(torch.from_numpy(gt), torch.from_numpy(props)).max(dim=1).values.numpy()
            for t in hits:
                hits[t] += int((best >= t).sum())
        return {
            "mean_per_image": float(np.mean([len(b) for b in self.boxes])),
            "seconds_per_image": float(np.mean(self.seconds)),
            "recall_iou50": hits[0.5] / max(total, 1),
            "recall_iou70": hits[0.7] / max(total, 1),
        }

    def sha1(self) -> str:
        """SHA-1 (40 hex digits) of the image ids and their boxes, for results.json: equal hashes
        mean equal proposals. Timings are left out (they differ on every run).

        Each image adds its id's UTF-8 bytes, a NUL, its box count as a little-endian int64 and its
        boxes as little-endian float32 in row order, so the hash does not depend on the machine's
        byte order and no two different sets hash the same bytes.
        """
        digest = hashlib.sha1()
        for image_id, boxes in zip(self.image_ids, self.boxes, strict=True):
            data = np.ascontiguousarray(boxes, dtype="<f4").reshape(-1, 4)
            digest.update(image_id.encode() + b"\0")
            digest.update(np.array(len(data), dtype="<i8").tobytes())
            digest.update(data.tobytes())
        return digest.hexdigest()


def image_seed(seed: int, image_id: str) -> int:
    """The C ``srand`` seed of one image: CRC-32 of ``"<seed>:<image_id>"``, in [0, 2**32).

    A stable hash (Python's hash() of a str changes from process to process), and a different one
    per image so that images do not all share the same sequence of ranks.
    """
    return zlib.crc32(f"{seed}:{image_id}".encode())


@functools.cache
def _c_srand() -> Callable[[int], None]:
    """The C library's srand, the one whose rand() OpenCV's selective search calls."""
    # dlopen(NULL) searches the symbols already loaded into the process, where OpenCV's rand()
    # binds too (the opencv-python wheels link the system's libc); on Windows the CRT is ucrtbase.
    candidates = [None, ctypes.util.find_library("c")] if os.name == "posix" else ["ucrtbase"]
    for name in candidates:
        try:
            srand = ctypes.CDLL(name).srand
        except (OSError, AttributeError, TypeError):
            continue
        srand.argtypes, srand.restype = [ctypes.c_uint], None
        return srand
    raise OSError("cannot find the C library's srand: selective search cannot be seeded here")


def selective_search(image: np.ndarray, cfg: ProposalConfig, image_id: str = "") -> np.ndarray:
    """Selective-search boxes of one image, the same on every call for the same image, id and cfg.

    Args:
        image: RGB uint8 (H, W, 3).
        cfg: the settings.
        image_id: names the image (the harness passes its file name's stem); with cfg.seed it seeds
            the random rank of the boxes.

    Returns:
        float32 (R, 4) xyxy boxes in the image's pixels, R <= cfg.max_proposals, no duplicates,
        every side >= cfg.min_side.
    """
    h, w = image.shape[:2]
    scale = min(1.0, cfg.resize_max_side / max(h, w))
    small = (
        image
        if scale == 1.0
        else cv2.resize(
            image,
            (max(1, round(w * scale)), max(1, round(h * scale))),
            interpolation=cv2.INTER_AREA,
        )
    )
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    if cfg.mode == "fast":
        ss.switchToSelectiveSearchFast()
    else:
        ss.switchToSelectiveSearchQuality()
    # process() ranks regions by rand() * level; the C library's generator is global to the process,
    # so it is seeded here, right before, from this image alone. (cv2.setRNGSeed, OpenCV's own
    # generator, does not change the result: checked.) rand() is shared by every thread of the
    # process, so two threads must not run this at once: compute()'s workers are single-threaded
    # processes, and the lock covers a Dask worker started with several threads.
    with _SRAND_LOCK:
        _c_srand()(image_seed(cfg.seed, image_id))
        rects = ss.process()
    rects = torch.from_numpy(rects.astype(np.float32).reshape(-1, 4))  # (x, y, w, h), small image
    boxes = torch.cat((rects[:, :2], rects[:, :2] + rects[:, 2:]), dim=1) / scale
    boxes = clip_boxes(torch.round(boxes * 100) / 100, (h, w))
    boxes = boxes[min_side_keep(boxes, cfg.min_side)]
    return boxes[unique_boxes(boxes)][: cfg.max_proposals].numpy()


def _worker(args: tuple[str, str, ProposalConfig]) -> tuple[np.ndarray, float]:
    """Selective search on one image file: (float32 (R, 4) boxes, seconds it took).

    Raises:
        DatasetError: for any failure, naming the file (a picklable, one-line error, so that it
            reaches the parent of a worker process intact).
    """
    path, image_id, cfg = args
    cv2.setNumThreads(1)
    try:
        image = read_image(path)
        start = time.perf_counter()
        boxes = selective_search(image, cfg, image_id)
    except DatasetError:
        raise
    except Exception as err:  # cv2.error and others: multi-line messages, maybe not picklable
        problem = " ".join(str(err).split())
        raise DatasetError(
            path, f"selective search failed ({type(err).__name__}: {problem})"
        ) from None
    return boxes, time.perf_counter() - start


def time_search(dataset: VOCDataset, indices: list[int], cfg: ProposalConfig) -> np.ndarray:
    """Selective search timed again in this process on the images ``indices`` of ``dataset``, one at
    a time on one OpenCV thread as a proposal worker runs it: a run's own figure, whether its
    proposals came from the cache or not (the cache's seconds were measured by whichever run, and
    machine, made it).

    Returns:
        float64 (len(indices),) seconds per image (decoding not included).
    """
    threads = cv2.getNumThreads()
    try:
        jobs = [
            (str(dataset.image_path(dataset.image_ids[i])), dataset.image_ids[i], cfg)
            for i in indices
        ]
        return np.array([_worker(job)[1] for job in jobs], dtype=np.float64)
    finally:
        cv2.setNumThreads(threads)


def _key(cfg: ProposalConfig) -> dict:
    """The settings that decide the proposals: the cache key's, and the cache's record of them."""
    return {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_KEY}


def cache_path(cache_dir: str | Path, dataset: VOCDataset, cfg: ProposalConfig) -> Path:
    """Where the proposals of this dataset split and these settings are cached."""
    key = json.dumps({"v": CACHE_VERSION, "data": dataset.fingerprint, **_key(cfg)}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return (
        Path(cache_dir)
        / f"{dataset.name}-{dataset.split}-{len(dataset)}-ss-{cfg.mode}-{digest}.npz"
    )


def save(path: Path, props: ProposalSet, dataset: VOCDataset, cfg: ProposalConfig) -> None:
    """Write a cache file atomically (a crash leaves no half-written cache behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    counts = np.array([len(b) for b in props.boxes], dtype=np.int64)
    np.savez(
        tmp,
        boxes=np.concatenate(props.boxes) if props.boxes else np.zeros((0, 4), np.float32),
        counts=counts,
        seconds=props.seconds,
        image_ids=np.array(props.image_ids),
        meta=np.array(
            json.dumps({"split": dataset.split, "data": dataset.fingerprint, **_key(cfg)})
        ),
    )
    tmp.replace(path)


def load(path: Path, dataset: VOCDataset) -> ProposalSet:
    """Read a cache file and check that it was computed for exactly this split's images.

    Raises:
        DamagedProposalCacheError: the file cannot be read back (truncated, not an .npz, arrays
            missing or of inconsistent sizes).
        ProposalCacheError: a readable cache of other images or annotations.
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            boxes, counts, seconds = f["boxes"], f["counts"], f["seconds"]
            image_ids = [str(i) for i in f["image_ids"]]
            meta = json.loads(str(f["meta"]))
    # What a truncated or overwritten .npz raises, depending on where it was cut: BadZipFile (no
    # zip directory), EOFError and ValueError (short or garbled array header or data), KeyError
    # (an array missing), OSError (unreadable); JSONDecodeError is a ValueError.
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise DamagedProposalCacheError(f"{path}: damaged proposal cache ({reason})") from None
    if (
        boxes.ndim != 2
        or boxes.shape[1] != 4
        or counts.ndim != 1
        or len(counts) != len(image_ids)
        or len(seconds) != len(image_ids)
        or (counts < 0).any()
        or int(counts.sum()) != len(boxes)
    ):
        raise DamagedProposalCacheError(
            f"{path}: damaged proposal cache (array sizes disagree: {len(boxes)} boxes, "
            f"{len(counts)} counts, {len(seconds)} timings, {len(image_ids)} image ids)"
        )
    if not isinstance(meta, dict):
        raise DamagedProposalCacheError(f"{path}: damaged proposal cache (meta is not a mapping)")
    if image_ids != list(dataset.image_ids):
        raise ProposalCacheError(
            f"{path}: proposal cache was computed for split {meta.get('split')!r} "
            f"({len(image_ids)} images), not for {dataset.name}/{dataset.split} "
            f"({len(dataset)} images): image ids differ; delete it or point at the right split"
        )
    if meta.get("data") != dataset.fingerprint:
        raise ProposalCacheError(f"{path}: stale proposal cache (annotations changed); delete it")
    boxes_list = list(np.split(boxes, np.cumsum(counts)[:-1]))
    return ProposalSet(image_ids, boxes_list, seconds, from_cache=True)


def compute(dataset: VOCDataset, cfg: ProposalConfig, workers: int = 1) -> ProposalSet:
    """Run selective search on every image of a split, with a progress bar: in ``workers`` processes
    of this machine, or on a Dask cluster (``cfg.executor``, ``cfg.scheduler``; without a scheduler,
    a LocalCluster of ``workers`` processes).

    The boxes do not depend on the executor or on ``workers`` (each image is seeded on its own).

    Raises:
        DatasetError: an image that is missing, cannot be decoded or yields no box, or whose worker
            failed; one line naming the file.
        ExecutorError: "dask": the scheduler cannot be reached, or no worker joined it.
        KeyboardInterrupt: re-raised after the queued images are dropped and the workers stopped.
    """
    # The seed key is the image file's name, not the split's id, so that the same image gets the same
    # proposals whatever format its data set is in (a COCO id is a number, a VOC id the file stem).
    jobs = [(str(path), path.stem, cfg) for path in map(dataset.image_path, dataset.image_ids)]
    desc = f"proposals {dataset.name}/{dataset.split}"
    try:
        results = map_tasks(_worker, jobs, cfg.executor, cfg.scheduler, workers, desc, "img")
    except WorkerLostError as err:
        raise DatasetError(
            jobs[err.index][0],
            "a proposal worker process died while this image (or one started with it) was being "
            "segmented; rerun with 1 worker to see which image fails",
        ) from None
    for (path, _, _), (boxes, _) in zip(jobs, results, strict=True):
        if len(boxes) == 0:
            raise DatasetError(path, "selective search found no box (blank image?)")
    return ProposalSet(
        image_ids=list(dataset.image_ids),
        boxes=[b for b, _ in results],
        seconds=np.array([s for _, s in results], dtype=np.float64),
    )


def load_or_compute(
    dataset: VOCDataset, cfg: ProposalConfig, cache_dir: str | Path, workers: int = 1
) -> tuple[ProposalSet, bool]:
    """The split's proposals from the cache, computing and caching them when absent or damaged.

    A damaged cache file (see :func:`load`) is reported in one line on stderr, deleted and
    recomputed; a readable cache of other images is still an error.

    Returns:
        (proposals, True when they came from the cache).

    Raises:
        ProposalCacheError: the cache file holds other images or annotations.
    """
    path = cache_path(cache_dir, dataset, cfg)
    if path.is_file():
        try:
            return load(path, dataset), True
        except DamagedProposalCacheError as err:
            # The key (dataset fingerprint and settings) is in the file name, so a damaged file
            # there can only be a write cut short or a copy gone wrong: nothing worth keeping.
            print(f"[rcnn-bench] {err}; deleting it and recomputing", file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)
    props = compute(dataset, cfg, workers)
    save(path, props, dataset, cfg)
    return props, False

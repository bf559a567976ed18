from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import select
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest
from distributed import LocalCluster
from rcnn_bench.datasets.voc import DatasetError, VOCDataset
from rcnn_bench.pipelines.parts import proposals as P
from rcnn_bench.pipelines.parts.proposals import (
    ProposalCacheError,
    ProposalConfig,
    ProposalSet,
    compute,
    image_seed,
    load_or_compute,
    selective_search,
)

from tests.conftest import default_sigint

CFG = ProposalConfig(resize_max_side=64, max_proposals=50, min_side=3)
DASK = ProposalConfig(**{**vars(CFG), "executor": "dask"})  # a LocalCluster of `workers` processes
REPO = Path(__file__).resolve().parents[2]


def test_selective_search_boxes_follow_the_rules(tiny_voc):
    ds = VOCDataset(tiny_voc[0], "test")
    image = ds.load_image(0)
    boxes = selective_search(image, CFG)
    h, w = image.shape[:2]
    assert 0 < len(boxes) <= 50 and boxes.dtype == np.float32
    assert (boxes[:, 2:] - boxes[:, :2] >= 3).all()
    assert (boxes >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    # Boxes are in original pixels although segmentation ran on a shrunk image (64 < 80..96).
    assert boxes[:, 2].max() > 64 or boxes[:, 3].max() > 64
    quality = selective_search(
        image, ProposalConfig(mode="quality", resize_max_side=64, max_proposals=2000)
    )
    assert len(quality) > len(selective_search(image, ProposalConfig(resize_max_side=64)))


def test_image_seed_is_a_fixed_crc32():
    # CRC-32 of "0:test_00000" and "7:test_00000": the same in every process and on every run.
    assert image_seed(0, "test_00000") == 129071483
    assert image_seed(7, "test_00000") == 1932103924


def test_selective_search_repeats_itself_in_one_process(tiny_voc):
    ds = VOCDataset(tiny_voc[0], "test")
    image, other = ds.load_image(0), ds.load_image(1)
    first = selective_search(image, CFG, ds.image_ids[0])
    # Another image in between moves the C library's rand() on; the next call reseeds it.
    selective_search(other, CFG, ds.image_ids[1])
    np.testing.assert_array_equal(selective_search(image, CFG, ds.image_ids[0]), first)


def test_seed_and_image_id_choose_the_order(tiny_voc):
    ds = VOCDataset(tiny_voc[0], "test")
    image = ds.load_image(0)
    every = ProposalConfig(resize_max_side=64, min_side=3)  # max_proposals 2000: no box cut off
    base = selective_search(image, every, "test_00000")
    reseeded = selective_search(image, ProposalConfig(**{**vars(every), "seed": 1}), "test_00000")
    renamed = selective_search(image, every, "test_00001")
    assert not np.array_equal(base, reseeded) and not np.array_equal(base, renamed)
    # The same regions, in another order.
    for boxes in (reseeded, renamed):
        assert sorted(map(tuple, boxes)) == sorted(map(tuple, base))
    # And only they changed it: the first settings again give the first order.
    np.testing.assert_array_equal(selective_search(image, every, "test_00000"), base)


def test_workers_do_not_change_the_proposals(tiny_voc):
    ds = VOCDataset(tiny_voc[0], "trainval")
    one, two = compute(ds, CFG, workers=1), compute(ds, CFG, workers=2)
    for a, b in zip(one.boxes, two.boxes, strict=True):
        np.testing.assert_array_equal(a, b)
    assert one.sha1() == two.sha1()
    other_seed = compute(ds, ProposalConfig(**{**vars(CFG), "seed": 1}), workers=1)
    assert other_seed.sha1() != one.sha1()


def test_sha1_covers_ids_and_boxes_but_not_timings():
    boxes = [np.array([[0, 1, 2, 3]], np.float32), np.zeros((0, 4), np.float32)]
    props = ProposalSet(["a", "bc"], boxes, np.array([0.5, 0.25]))
    expected = hashlib.sha1(
        b"a\0"
        + struct.pack("<q", 1)
        + struct.pack("<4f", 0, 1, 2, 3)
        + b"bc\0"
        + struct.pack("<q", 0)
    ).hexdigest()
    assert props.sha1() == expected
    assert ProposalSet(["a", "bc"], boxes, np.array([9.0, 9.0])).sha1() == expected
    # The same boxes under the other image: another hash.
    assert ProposalSet(["a", "bc"], boxes[::-1], props.seconds).sha1() != expected


def test_images_at_the_cap_are_counted():
    boxes = [np.zeros((n, 4), np.float32) for n in (3, 0, 2, 3)]
    props = ProposalSet(["a", "b", "c", "d"], boxes, np.zeros(4))
    assert [props.images_at(cap) for cap in (1, 2, 3, 4)] == [3, 3, 2, 0]


def test_computed_once_then_read_from_cache(tiny_voc, tmp_path):
    ds = VOCDataset(tiny_voc[0], "trainval")
    first, cached = load_or_compute(ds, CFG, tmp_path, workers=2)
    assert not cached and first.image_ids == ds.image_ids
    with mock.patch.object(P, "compute", side_effect=AssertionError("recomputed")):
        second, cached = load_or_compute(ds, CFG, tmp_path, workers=1)
    assert cached and second.sha1() == first.sha1()
    assert not first.from_cache and second.from_cache  # where its recorded seconds were measured
    for a, b in zip(first.boxes, second.boxes, strict=True):
        np.testing.assert_array_equal(a, b)
    stats = second.stats(ds)
    assert stats["mean_per_image"] > 0 and 0 < stats["recall_iou50"] <= 1
    assert stats["recall_iou70"] <= stats["recall_iou50"]
    # Other parameters, the seed included, are another cache entry.
    assert P.cache_path(tmp_path, ds, CFG) != P.cache_path(tmp_path, ds, ProposalConfig())
    reseeded = ProposalConfig(**{**vars(CFG), "seed": 1})
    assert P.cache_path(tmp_path, ds, CFG) != P.cache_path(tmp_path, ds, reseeded)


def test_time_search_times_the_asked_images_and_keeps_opencvs_threads(tiny_voc):
    ds = VOCDataset(tiny_voc[0], "trainval")
    threads = cv2.getNumThreads()
    seen, original = [], P._worker

    def worker(job):
        seen.append(job[1])
        return original(job)

    with mock.patch.object(P, "_worker", side_effect=worker):
        seconds = P.time_search(ds, [2, 0], CFG)
    assert seconds.shape == (2,) and (seconds > 0).all()
    assert seen == [ds.image_ids[2], ds.image_ids[0]]
    assert cv2.getNumThreads() == threads  # the process's own setting is given back


def test_cache_of_another_split_is_refused(tiny_voc, tmp_path):
    train, test = VOCDataset(tiny_voc[0], "trainval"), VOCDataset(tiny_voc[0], "test")
    load_or_compute(test, CFG, tmp_path, workers=1)
    shutil.copy(P.cache_path(tmp_path, test, CFG), P.cache_path(tmp_path, train, CFG))
    with pytest.raises(ProposalCacheError, match=r"computed for split 'test'.*image ids differ"):
        load_or_compute(train, CFG, tmp_path)


def _without_meta(path: Path) -> None:
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files if k != "meta"}
    np.savez(path, **arrays)


def _one_count_more(path: Path) -> None:
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["counts"] = arrays["counts"] + np.eye(1, len(arrays["counts"]), dtype=np.int64)[0]
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "(BadZipFile: "),
        (lambda p: p.write_bytes(b""), "(EOFError: "),
        (lambda p: p.write_bytes(b"junk"), "(ValueError: "),
        (_without_meta, "(KeyError: "),
        (_one_count_more, "(array sizes disagree: "),
    ],
    ids=["truncated", "zero-byte", "junk", "missing-array", "counts-disagree"],
)
def test_damaged_cache_is_recomputed(tiny_voc, tmp_path, capsys, damage, reason):
    ds = VOCDataset(tiny_voc[0], "test")
    original, _ = load_or_compute(ds, CFG, tmp_path)
    path = P.cache_path(tmp_path, ds, CFG)
    damage(path)
    capsys.readouterr()
    props, cached = load_or_compute(ds, CFG, tmp_path)
    assert not cached and props.sha1() == original.sha1()
    # splitlines() also splits at the progress bar's carriage returns.
    notes = [s for s in capsys.readouterr().err.splitlines() if s.startswith("[rcnn-bench]")]
    assert len(notes) == 1
    assert notes[0].startswith(f"[rcnn-bench] {path}: damaged proposal cache {reason}")
    assert notes[0].endswith("); deleting it and recomputing")
    # The rewritten file is whole again: read back without recomputing.
    with mock.patch.object(P, "compute", side_effect=AssertionError("recomputed")):
        again, cached = load_or_compute(ds, CFG, tmp_path)
    assert cached and again.sha1() == original.sha1()


@pytest.mark.parametrize("cfg", [CFG, DASK], ids=["local", "dask"])
def test_zero_byte_image_in_a_worker_names_the_file(tiny_voc, tmp_path, cfg):
    root = shutil.copytree(tiny_voc[0], tmp_path / "tiny")
    ds = VOCDataset(root, "test")
    broken = ds.image_path("test_00002")
    broken.write_bytes(b"")
    with pytest.raises(DatasetError) as err:
        compute(ds, cfg, workers=2)
    assert str(err.value) == f"{broken}: image file is empty (0 bytes)"
    assert err.value.path == str(broken)


def test_worker_errors_become_picklable_one_line_dataset_errors(tiny_voc):
    path = str(VOCDataset(tiny_voc[0], "test").image_path("test_00000"))
    failure = cv2.error("OpenCV(5.1.0) selectivesearch.cpp:1: error:\n  bad things")
    with mock.patch.object(P, "selective_search", side_effect=failure):
        with pytest.raises(DatasetError) as err:
            P._worker((path, "test_00000", CFG))
    message = (
        f"{path}: selective search failed "
        "(error: OpenCV(5.1.0) selectivesearch.cpp:1: error: bad things)"
    )
    assert str(err.value) == message
    copy = pickle.loads(pickle.dumps(err.value))
    assert type(copy) is DatasetError and str(copy) == message
    assert (copy.path, copy.problem) == (err.value.path, err.value.problem)


def test_bad_mode():
    with pytest.raises(ValueError, match=r"proposals\.mode"):
        ProposalConfig(mode="slow")


def test_bad_executor_and_a_scheduler_without_dask():
    with pytest.raises(
        ValueError, match=r"^proposals\.executor must be 'local' or 'dask', got 'ray'$"
    ):
        ProposalConfig(executor="ray")
    with pytest.raises(
        ValueError, match=r"^proposals\.scheduler \('tcp://h:8786'\) is for executor"
    ):
        ProposalConfig(scheduler="tcp://h:8786")


# --- the Dask executor (pipelines.executors) ---


def test_dask_gives_the_local_pools_proposals_bit_for_bit(tiny_voc):
    ds = VOCDataset(tiny_voc[0], "trainval")
    local, dask = compute(ds, CFG, workers=2), compute(ds, DASK, workers=2)
    for a, b in zip(local.boxes, dask.boxes, strict=True):
        np.testing.assert_array_equal(a, b)
    assert dask.sha1() == local.sha1()


def test_a_scheduler_with_a_two_thread_worker_gives_the_same_proposals(tiny_voc):
    # As a cluster started by hand might be (`dask worker ADDRESS --nthreads 2`): selective search
    # takes a lock around the C library's rand(), so the threads cannot interleave their draws.
    ds = VOCDataset(tiny_voc[0], "trainval")
    with LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": ":0"},
    ) as cluster:
        remote = ProposalConfig(**{**vars(DASK), "scheduler": cluster.scheduler_address})
        props = compute(ds, remote)
    assert props.sha1() == compute(ds, CFG).sha1()


def test_cache_key_leaves_out_where_the_proposals_were_computed(tiny_voc, tmp_path):
    ds = VOCDataset(tiny_voc[0], "test")
    local, cached = load_or_compute(ds, CFG, tmp_path, workers=1)
    assert not cached
    remote = ProposalConfig(**{**vars(DASK), "scheduler": "tcp://nowhere:8786"})
    with mock.patch.object(P, "compute", side_effect=AssertionError("recomputed")):
        for cfg in (DASK, remote):
            props, cached = load_or_compute(ds, cfg, tmp_path, workers=2)
            assert cached and props.sha1() == local.sha1()
    # The key is version 2's, as before the two fields existed: old caches stay valid.
    fields = {"mode": "fast", "resize_max_side": 64, "min_side": 3, "max_proposals": 50, "seed": 0}
    key = json.dumps({"v": 2, "data": ds.fingerprint, **fields}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    assert P.cache_path(tmp_path, ds, DASK) == tmp_path / f"tiny-test-4-ss-fast-{digest}.npz"


def _die_on_test_00001(marker: str, job: tuple[str, str, ProposalConfig]):
    """P._worker, but the first time it gets test_00001 it kills its own (Dask worker) process."""
    if job[1] == "test_00001" and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return P._worker(job)


def test_a_killed_dask_worker_still_gives_a_whole_cache(tiny_voc, tmp_path):
    ds = VOCDataset(tiny_voc[0], "test")
    marker = tmp_path / "killed"
    # The tasks are sent by reference to this module's function, which calls the real _worker.
    dying = functools.partial(_die_on_test_00001, str(marker))
    with mock.patch.object(P, "_worker", dying):
        props, cached = load_or_compute(ds, DASK, tmp_path / "cache", workers=2)
    assert not cached and marker.exists()  # one worker did die
    assert props.sha1() == compute(ds, CFG, workers=1).sha1()  # the local pool's (shown above)
    again, cached = load_or_compute(ds, CFG, tmp_path / "cache")
    assert cached and again.sha1() == props.sha1()


# --- worker processes and the parent's death or interruption (Linux: /proc, prctl) ---

_CHILD = textwrap.dedent(
    """
    import sys

    from rcnn_bench.datasets.voc import VOCDataset
    from rcnn_bench.pipelines.runtime import executors
    from rcnn_bench.pipelines.parts import proposals as P


    def announce(items, *args, **kwargs):  # stands in for the executors' progress bar
        for i, item in enumerate(items):
            yield item
            if i == 0:  # the first image is done: the pool and its workers are running
                print("running", flush=True)


    if __name__ == "__main__":
        executors.progress = announce
        ds = VOCDataset(sys.argv[1], "test")
        cfg = P.ProposalConfig(mode="quality", resize_max_side=160, executor=sys.argv[2])
        P.compute(ds, cfg, workers=2)
        print("finished", flush=True)
    """
)


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields from the 3rd (state) on, or None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _alive(pid: int, start: str) -> bool:
    """Whether process PID, started at clock tick ``start``, still runs (a zombie does not)."""
    fields = _stat(pid)
    return fields is not None and fields[19] == start and fields[0] not in "ZX"


def _workers_of(pid: int) -> dict[int, str]:
    """{pid: start tick} of the pool workers whose parent is PID."""
    found = {}
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is None or fields[1] != str(pid):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found[int(entry.name)] = fields[19]
    return found


def _wait_dead(procs: dict[int, str], seconds: float) -> list[int]:
    """The pids of ``procs`` still alive after at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while (left := [p for p, s in procs.items() if _alive(p, s)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture(params=["local", "dask"])
def running_child(tmp_path, request):
    """(child process, {worker pid: start tick}) of a Python child whose compute() runs 2 workers
    (a local pool, or a Dask LocalCluster) on 32 images of about 0.5 s each; the child and workers
    are killed afterwards if still there."""
    root = tmp_path / "voc"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"img{k:02d}" for k in range(32)]
    for image_id in ids:  # 8x8 blocks of random colour, with noise: many regions to merge
        blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = cv2.resize(blocks, (160, 160), interpolation=cv2.INTER_NEAREST)
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), image)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            "<annotation><size><width>160</width><height>160</height></size></annotation>"
        )
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("thing\n")  # no objects to find the classes from
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, str(script), str(root), request.param],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, as a shell job is: Ctrl-C goes to it alone
        preexec_fn=default_sigint,
    )
    workers = {}
    try:
        ready, _, _ = select.select([child.stdout], [], [], 60)
        line = child.stdout.readline() if ready else ""
        assert line == "running\n", child.stderr.read() if child.poll() is not None else line
        workers = _workers_of(child.pid)
        assert len(workers) == 2 and all(_alive(pid, start) for pid, start in workers.items())
        yield child, workers
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        for pid in _wait_dead(workers, 0):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and prctl")
def test_workers_die_with_a_killed_parent(running_child):
    child, workers = running_child
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert _wait_dead(workers, 5) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and prctl")
def test_ctrl_c_stops_compute_within_seconds(running_child):
    child, workers = running_child
    start = time.monotonic()
    os.killpg(child.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    returncode = child.wait(30)
    elapsed = time.monotonic() - start
    # About 15 s of queued images are left; only the ones running may finish.
    assert elapsed < 4, f"took {elapsed:.1f} s"
    assert returncode == -signal.SIGINT
    assert child.stderr.read().rstrip().splitlines()[-1] == "KeyboardInterrupt"
    assert _wait_dead(workers, 1) == []

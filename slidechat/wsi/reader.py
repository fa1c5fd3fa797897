"""The one patch reader: a patch grid's pixels as uint8 batches, for extraction and screening alike.

Patches are read by forked reader processes, each with its own slide handle (a handle does not
survive a fork), that hand batches over in recycled shared-memory slots (:func:`stream_batches`), or in
the calling process on the handle it already holds. A reader error becomes a
:class:`ReadFailure` value, so it crosses the worker boundary intact. ``balance_workers`` splits the
cores between reader processes and the encoder from a probe batch's measured costs.
"""

from __future__ import annotations

import math
import mmap
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike
from slidechat.wsi.patching import PatchGrid
from slidechat.wsi.slide import Slide


@dataclass(frozen=True)
class ReadFailure:
    """A reader error as plain data: it crosses the worker boundary intact (torch would wrap an exception
    in a multi-line traceback text), so the failure line is the same with 0 or N workers."""

    reason: str
    path: Optional[str]
    hint: Optional[str] = None

    @classmethod
    def of(cls, e: BaseException, path: Path) -> "ReadFailure":
        if isinstance(e, SlideChatError):
            return cls(e.reason, e.path, e.hint)
        return cls(f"{type(e).__name__}: {e}", str(path))

    def error(self) -> SlideChatError:
        return SlideChatError(self.reason, self.path, hint=self.hint)


class PatchReader:
    """Reads a grid's patches as uint8 ``(b, S, S, 3)``: ``S`` is the patch size, or the encoder's input
    size when ``host_resize`` = ``(h, w, filter)`` asks the reader to do the encoder's resize in PIL.

    Fast at every base magnification, with no per-pixel Python: a run of horizontally adjacent patches is
    one ``read_region`` (tiles shared by neighbours decoded once, helped by a per-process tile cache);
    an integer downsample (40x -> 20x) is PIL ``reduce`` on the whole run; a non-integer one is PIL
    ``resize(box=...)`` per patch (area filter); a matching pyramid level is read at its native size.

    ``slide``: the handle the calling process already holds (the slide is opened once per extraction);
    the reader uses it in this process and leaves closing it to its owner. Worker processes open their own.
    """

    def __init__(self, path: PathLike, grid: PatchGrid, batch_size: int = 64, run_reads: bool = True,
                 host_resize: Optional[Tuple[int, int, str]] = None, cache_mb: float = 0,
                 max_run: int = 32, direct_tiles: bool = True, slide: Optional[Slide] = None) -> None:
        self.path = Path(path)
        self.coords = grid.coords
        self.level = grid.read_level
        self.read_size = grid.read_size
        self.patch_size = grid.patch_size
        self.step0 = grid.step_level0
        self.host_resize = host_resize
        self.cache_mb = cache_mb
        self.max_run = max(1, int(max_run))
        # a run of horizontally adjacent patches is one read when patches tile the level exactly
        exact = abs(grid.patch_size_level0 / grid.read_downsample - grid.read_size) < 1e-6
        self.run_reads = run_reads and exact and grid.step_level0 == grid.patch_size_level0
        ds = grid.read_downsample
        # direct tile decoding needs patch origins on whole pixels of the read level
        self.direct_tiles = direct_tiles and abs(ds - round(ds)) < 1e-9 and \
            bool((grid.coords % max(1, int(round(ds))) == 0).all())
        self.batches = [np.arange(i, min(i + batch_size, len(grid)))
                        for i in range(0, len(grid), max(1, int(batch_size)))]
        self._slide: Optional[Slide] = None
        self._pid: Optional[int] = None
        self._owned = False  # whether this process opened self._slide (and so closes it)
        if slide is not None:
            self._slide, self._pid = self._prepare(slide), os.getpid()

    @property
    def out_size(self) -> Tuple[int, int]:
        return (self.host_resize[0], self.host_resize[1]) if self.host_resize else \
            (self.patch_size, self.patch_size)

    def _handle(self) -> Slide:
        """This process's handle: the one given or opened here, or in a forked reader process the
        parent's, made safe for this process (``Slide.forked``: no reopening, no second self-check)."""
        if self._slide is None:
            self._slide = self._prepare(Slide(self.path))
        elif self._pid != os.getpid():
            self._slide = self._slide.forked()
        else:
            return self._slide
        self._pid = os.getpid()
        self._owned = True
        return self._slide

    def _prepare(self, slide: Slide) -> Slide:
        """Direct tile decoding where the slide allows it (a no-op on a handle that has it), else an
        OpenSlide tile cache of ``cache_mb``."""
        direct = False
        if self.direct_tiles:
            probe = tuple(int(v) for v in self.coords[len(self.coords) // 2]) if len(self.coords) else None
            direct = slide.enable_direct_tiles(self.cache_mb, probe)
        if not direct:
            slide.set_cache_size(self.cache_mb)
        elif len(self.coords) and slide.reads_directly(self.level):
            # patches are read row by row: the cache holds the band of tiles they share, not cache_mb
            ds = slide.level_downsamples[self.level]
            xs = self.coords[:, 0]
            integer = self.read_size == self.patch_size or self.read_size % self.patch_size == 0
            slide.fit_tile_cache(self.level, int(xs.min() // ds), int(xs.max() // ds) + self.read_size,
                                 self.read_size, self.read_size // self.patch_size if integer else 1)
        return slide

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid() and self._owned:
            self._slide.close()
        self._slide = None
        self._owned = False

    def read(self, idx: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """uint8 patches for grid rows ``idx`` (any order), at :attr:`out_size`; written into ``out``
        (``(len(idx), h, w, 3)``, e.g. a shared-memory slot) when given."""
        from PIL import Image

        s = self._handle()
        P, r = self.patch_size, self.read_size
        oh, ow = self.out_size
        if out is None:
            out = np.empty((len(idx), oh, ow, 3), np.uint8)
        integer = r == P or (r > P and r % P == 0)  # native, or integer downsample (the 40x -> 20x case)
        if integer and self.host_resize is None and s.reads_directly(self.level):
            # each patch composed from the cached tiles straight into its slot of ``out``: no region
            # buffer, no second copy (tiles shared by neighbours are still decoded once)
            for j, row in enumerate(idx):
                x, y = self.coords[row]
                s.read_region_reduced((int(x), int(y)), self.level, (r, r), r // P, out[j])
            return out
        runs = self._runs(idx) if self.run_reads else [[j] for j in range(len(idx))]
        for run in runs:
            x, y = self.coords[idx[run[0]]]
            if integer:
                arr = s.read_region_reduced((int(x), int(y)), self.level, (r * len(run), r), r // P)
                if self.host_resize is None:
                    for k, j in enumerate(run):
                        out[j] = arr[:, k * P:(k + 1) * P]
                else:
                    filt = PIL_FILTERS[self.host_resize[2]]
                    for k, j in enumerate(run):
                        out[j] = np.asarray(Image.fromarray(arr[:, k * P:(k + 1) * P]).resize((ow, oh), filt))
                continue
            # non-integer factor (or finer than the scan): per patch, area filter down / bicubic up
            region = s.read_region_image((int(x), int(y)), self.level, (r * len(run), r))
            method = Image.Resampling.BOX if r > P else Image.Resampling.BICUBIC
            for k, j in enumerate(run):
                patch = region.resize((P, P), method, box=(k * r, 0, (k + 1) * r, r))
                if self.host_resize is not None:
                    patch = patch.resize((ow, oh), PIL_FILTERS[self.host_resize[2]])
                out[j] = np.asarray(patch)
        return out

    def _runs(self, idx: np.ndarray) -> List[List[int]]:
        runs: List[List[int]] = []
        for j, row in enumerate(idx):
            if runs and len(runs[-1]) < self.max_run:
                pj = idx[runs[-1][-1]]
                if (self.coords[row, 1] == self.coords[pj, 1]
                        and self.coords[row, 0] - self.coords[pj, 0] == self.step0):
                    runs[-1].append(j)
                    continue
            runs.append([j])
        return runs


#: ``host_resize`` filter names -> PIL resampling codes
PIL_FILTERS: Dict[str, int] = {"bicubic": 3, "bilinear": 2, "box": 4, "hamming": 5, "lanczos": 1,
                               "nearest": 0}


def read_batch(reader: PatchReader, idx: np.ndarray, out: Optional[np.ndarray] = None) -> Tuple[Any, float]:
    """``(patches or ReadFailure, seconds)``: failures are values, never exceptions across processes."""
    t = time.perf_counter()
    try:
        res: Any = reader.read(idx, out)
    except Exception as e:  # noqa: BLE001 - every reader error becomes the slide's one failure line
        res = ReadFailure.of(e, reader.path)
    return res, time.perf_counter() - t


#: shared-memory slots per reader process: one being filled while the last one waits or is encoded
SLOTS_PER_READER = 2
#: seconds between checks that the reader processes are still alive while waiting on them
_LIVENESS_S = 1.0


def stream_batches(reader: PatchReader, batches: Sequence[np.ndarray], workers: int) -> Iterator[Any]:
    """``(patches, idx, seconds)`` for every batch, read by ``workers`` processes (0: this process), in
    the order they are ready; a :class:`ReadFailure` ends the stream.

    The hand-over costs no copy and no fresh memory: the patches are read straight into one of a few
    shared-memory slots mapped before the fork, and the main process receives a slot number. A slot is
    reused only once the consumer asks for the next item, so **each yielded array is valid until the
    next iteration**. (Handing torch tensors over a DataLoader allocated and faulted in a new 10 MB
    shared-memory segment per batch: 15 ms per 64 patches, as much CPU as decoding the 20x tiles.)
    Each reader takes a contiguous share of the batches: neighbouring rows share tiles, so the tile
    cache of that reader decodes each tile once.
    """
    batches = list(batches)
    ctx = mp_context()
    if not batches:
        return
    if workers <= 0 or ctx is None:
        for b in batches:
            arr, secs = read_batch(reader, b)
            if isinstance(arr, ReadFailure):
                yield arr
                return
            yield arr, b, secs
        return
    yield from _ReaderPool(reader, batches, workers, ctx).stream()


class _ReaderPool:
    """Forked reader processes and the shared-memory slots they fill (see :func:`stream_batches`)."""

    def __init__(self, reader: PatchReader, batches: List[np.ndarray], workers: int, ctx: Any) -> None:
        self.reader, self.batches = reader, batches
        self.workers = max(1, min(int(workers), len(batches)))
        n_slots = SLOTS_PER_READER * self.workers
        rows = max((len(b) for b in batches), default=1)
        oh, ow = reader.out_size
        # anonymous MAP_SHARED memory, inherited by the forked readers; populated here once, so no
        # process pays a first-touch fault per page of a fresh shared page
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        self._mem = mmap.mmap(-1, max(1, n_slots * rows * oh * ow * 3), flags=flags)
        self.slots = np.frombuffer(self._mem, np.uint8).reshape(n_slots, rows, oh, ow, 3)
        # each reader has its own slots (its page tables map them once), returned to it after use
        self.free = [ctx.Queue() for _ in range(self.workers)]
        self.done = ctx.Queue()
        for k in range(n_slots):
            self.free[k // SLOTS_PER_READER].put(k)
        n = len(batches)
        shares = [range((w * n) // self.workers, ((w + 1) * n) // self.workers) for w in range(self.workers)]
        self.procs = [ctx.Process(target=self._work, args=(w, share), daemon=True)
                      for w, share in enumerate(shares)]

    def _work(self, w: int, share: range) -> None:
        """Reader process ``w``: its share of the batches, each into one of its free slots."""
        worker_init(0)
        try:
            for i in share:
                b = self.batches[i]
                k = self.free[w].get()
                res, secs = read_batch(self.reader, b, self.slots[k, :len(b)])
                if isinstance(res, ReadFailure):
                    self.done.put(res)
                    return
                self.done.put((k, i, secs))
        finally:
            self.reader.close()

    def stream(self) -> Iterator[Any]:
        for p in self.procs:
            p.start()
        try:
            for _ in range(len(self.batches)):
                item = self._next()
                if isinstance(item, ReadFailure):
                    yield item
                    return
                k, i, secs = item
                b = self.batches[i]
                yield self.slots[k, :len(b)], b, secs
                self.free[k // SLOTS_PER_READER].put(k)  # the consumer is done with slot k
        finally:
            self._stop()

    def _next(self) -> Any:
        while True:
            try:
                return self.done.get(timeout=_LIVENESS_S)
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode not in (None, 0)]
                if dead:
                    return ReadFailure(f"a reader process died (exit code {dead[0].exitcode})",
                                       str(self.reader.path))

    def _stop(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join()
        for q in self.free + [self.done]:
            q.close()
            q.cancel_join_thread()
        del self.slots
        try:
            self._mem.close()
        except BufferError:  # a caller still holds a view of the last batch: freed with it
            pass


def worker_init(_: int) -> None:
    """One thread per reader process: the cores are shared out by ``balance_workers``."""
    import torch

    torch.set_num_threads(1)


def mp_context() -> Any:
    """``fork`` where available (None elsewhere: readers then run in the calling process): workers start
    in milliseconds and inherit the shared-memory slots and the reader. Workers therefore never run an
    OpenCV call that could use its thread pool, which does not survive a fork."""
    import multiprocessing as mp

    return mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def balance_workers(read_s_per_patch: float, encode_s_per_patch: float, encoder_threads: int,
                    device_type: str, cores: Optional[int] = None) -> Tuple[int, int]:
    """``(reader processes, encoder threads)`` from a probe batch's measured costs.

    CPU (both costs measured single-threaded): unless the encoder clearly dominates (> 90 % of the
    probe's time: CONCH or ResNet-50 on CPU, 10-1000x the cost of decoding a patch), every core gets a
    reader and the encoder one thread —
    single-threaded processes time-share the cores without idling, and a 16-patch probe on a shared
    machine is too noisy (3-10x swings measured) for finer splits; when it dominates, one reader and
    every core for the encoder's threads. GPU: enough
    readers that they deliver patches as fast as the GPU encodes them, one core left for the main process.
    """
    cores = cores or cpu_cores()
    r = max(read_s_per_patch, 1e-6)
    e = max(encode_s_per_patch, 1e-6)
    if device_type != "cpu":
        return max(1, min(math.ceil(r / e), max(1, cores - 1))), encoder_threads
    if r / (r + e) >= 0.1:
        return cores, 1
    return 1, cores



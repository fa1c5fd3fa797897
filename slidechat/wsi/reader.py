"""The one patch reader: a patch grid's pixels as uint8 batches, for extraction and screening alike.

Patches are read by DataLoader worker processes, each with its own slide handle (a handle does not
survive a fork), or in the calling process on the handle it already holds. A reader error becomes a
:class:`ReadFailure` value, so it crosses the worker boundary intact. ``balance_workers`` splits the
cores between reader processes and the encoder from a probe batch's measured costs.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

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
        if self._slide is None or self._pid != os.getpid():  # one handle per process
            self._slide = self._prepare(Slide(self.path))
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
        return slide

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid() and self._owned:
            self._slide.close()
        self._slide = None
        self._owned = False

    def read(self, idx: np.ndarray) -> np.ndarray:
        """uint8 patches for grid rows ``idx`` (any order), at :attr:`out_size`."""
        from PIL import Image

        s = self._handle()
        P, r = self.patch_size, self.read_size
        oh, ow = self.out_size
        out = np.empty((len(idx), oh, ow, 3), np.uint8)
        runs = self._runs(idx) if self.run_reads else [[j] for j in range(len(idx))]
        for run in runs:
            x, y = self.coords[idx[run[0]]]
            if r == P or (r > P and r % P == 0):  # native, or integer downsample (the 40x -> 20x case)
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


def read_batch(reader: PatchReader, idx: np.ndarray) -> Tuple[Any, float]:
    """``(patches or ReadFailure, seconds)``: failures are values, never exceptions across processes."""
    t = time.perf_counter()
    try:
        out: Any = reader.read(idx)
    except Exception as e:  # noqa: BLE001 - every reader error becomes the slide's one failure line
        out = ReadFailure.of(e, reader.path)
    return out, time.perf_counter() - t


def batch_stream(reader: PatchReader, batches: Sequence[np.ndarray]) -> Any:
    """Iterable dataset: each worker reads a *contiguous* share of the batches (neighbouring rows share
    tiles, so the tile cache of that worker decodes each tile once). Yields ``(patches, idx, seconds)``
    or a :class:`ReadFailure`, then stops."""
    from torch.utils.data import IterableDataset

    class _BatchStream(IterableDataset):
        def __iter__(self) -> Any:
            return _iter_share(reader, list(batches))

    return _BatchStream()


def _iter_share(reader: PatchReader, batches: List[np.ndarray]) -> Any:
    import torch
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    n = len(batches)
    lo, hi = (wid * n) // nw, ((wid + 1) * n) // nw
    for b in batches[lo:hi]:
        arr, secs = read_batch(reader, b)
        if isinstance(arr, ReadFailure):
            yield arr
            return
        yield torch.from_numpy(arr), torch.from_numpy(b), secs


def worker_init(_: int) -> None:
    """One thread per reader process: the cores are shared out by ``balance_workers``."""
    import torch

    torch.set_num_threads(1)


def mp_context() -> Any:
    """``fork`` where available: workers start in milliseconds. Workers therefore never touch OpenCV,
    whose thread pool does not survive a fork (resizing in workers uses PIL)."""
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



#!/usr/bin/env python
"""Extraction speed, side by side in one run, on the same slide and the same patch coordinates.

For each slide (a 40x and a 20x synthetic Aperio slide by default) and encoder, prints patches/s of:

(a) tile-decode limit: every JPEG tile under the patches decoded exactly once (tifffile/imagecodecs,
    libjpeg-turbo), split over N processes — no compositing, resizing or encoding;
(b) CLAM-style baseline, written here from CLAM's data path (``Whole_Slide_Bag_FP``): a Dataset whose item
    is one OpenSlide ``read_region(coord, level, (r, r)).convert('RGB')`` + torchvision ``Resize(224)``,
    ``ToTensor``, ``Normalize`` (ImageNet), read by a ``DataLoader(batch_size=256, num_workers=N)``, and
    the same encoder's forward on every batch (same compute as slidechat's);
(b0) the same with a free encoder (CLAM's data path alone, as FACTS.md measured it);
(c) slidechat: the whole ``extract_slides`` pipeline (open, tissue segmentation, patch plan, reading,
    encoding, H5 + QC writes), in this process, with its automatic reader/thread balance; and (c0) the
    same with a free encoder, which isolates the read path.
Repeats are interleaved (a, b0, b, c0, c, a, ...) so machine-load drift hits all alike; the median of the
repeats and the per-repeat ratios are printed. No timing assertions live in tests; this is it.

``--part ratio`` (issue 15) measures CPU time, not wall time, so a shared machine's load matters less:
the bare decode of the needed tiles in this process (``time.process_time``) against (r1) one
``PatchReader`` reading every patch in this process and (rN) the reader processes of the whole pipeline
with a free encoder (``getrusage(RUSAGE_CHILDREN)``: user + sys of every reader process, fork, slide
open, self-check and hand-over included). The reader processes' CPU is also split into a steady cost per
patch and a fixed cost per reader process and slide (fork, exit, first touch of its memory), from a short
and a full run of the same readers: on a small slide the fixed cost weighs on rN. ``--part large`` runs
one large encoder (``uni2_h``, random weights, CPU) end to end on a small slide beside the free encoder,
to show where compute takes over.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from slidechat.apps.extract import extract_slides
from slidechat.features.encoders import build_encoder
from slidechat.features.encoders.base import PatchEncoder
from slidechat.wsi.patching import plan_patches
from slidechat.wsi.reader import SLOTS_PER_READER, PatchReader, stream_batches
from slidechat.wsi.slide import Slide, resolve_resolution
from slidechat.wsi.synthetic import SlideSpec, write_slide
from slidechat.wsi.tissue import segment_tissue


# ----------------------------------------------------------------------------------------------
# (a) the tile-decode limit


def _needed_tiles(coords: np.ndarray, read_size: int, downsample: float, tile: int) -> List[Tuple[int, int]]:
    tiles = set()
    for x, y in coords:
        lx, ly = int(x // downsample), int(y // downsample)
        for ty in range(ly // tile, (ly + read_size - 1) // tile + 1):
            for tx in range(lx // tile, (lx + read_size - 1) // tile + 1):
                tiles.add((ty, tx))
    return sorted(tiles)


def _decode_tiles(args: Tuple[str, int, List[Tuple[int, int]]]) -> int:
    import tifffile

    path, page_index, tiles = args
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[page_index]
        nx = -(-int(page.imagewidth) // int(page.tilewidth))
        fh = tf.filehandle
        decode = page.decode  # first access reads from the file: before any seek
        for ty, tx in tiles:
            i = ty * nx + tx
            fh.seek(int(page.dataoffsets[i]))
            data = fh.read(int(page.databytecounts[i]))
            decode(data, i, jpegtables=page.jpegtables)
    return len(tiles)


def _decode_plan(path: str, grid) -> Tuple[int, List[Tuple[int, int]]]:
    """The TIFF page of the grid's read level and the tiles under its patches."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        W, H = grid.read_level_dim
        page_index = next(i for i, p in enumerate(tf.pages)
                          if p.is_tiled and (p.imagewidth, p.imagelength) == (W, H))
        tile = int(tf.pages[page_index].tilewidth)
    return page_index, _needed_tiles(grid.coords, grid.read_size, grid.read_downsample, tile)


def decode_limit(path: str, grid, procs: int) -> Tuple[float, int]:
    """Seconds to decode every needed tile once with ``procs`` processes, and the tile count."""
    page_index, tiles = _decode_plan(path, grid)
    chunks = [tiles[i * len(tiles) // procs:(i + 1) * len(tiles) // procs] for i in range(procs)]
    t = time.perf_counter()
    if procs == 1:
        _decode_tiles((path, page_index, chunks[0]))
    else:
        with mp.get_context("fork").Pool(procs) as pool:
            pool.map(_decode_tiles, [(path, page_index, c) for c in chunks])
    return time.perf_counter() - t, len(tiles)


def decode_cpu(path: str, grid) -> Tuple[float, int]:
    """CPU seconds (user + sys, this process) to decode every needed tile once, and the tile count."""
    page_index, tiles = _decode_plan(path, grid)
    t = time.process_time()
    _decode_tiles((path, page_index, tiles))
    return time.process_time() - t, len(tiles)


# ----------------------------------------------------------------------------------------------
# (b) the CLAM-style baseline


class ClamStyleBag:
    """CLAM's ``Whole_Slide_Bag_FP`` data path: one ``read_region`` + torchvision transforms per patch."""

    def __init__(self, path: str, coords: np.ndarray, level: int, size: int, target: int) -> None:
        from torchvision import transforms

        self.path, self.coords, self.level, self.size = path, coords, level, size
        self.tf = transforms.Compose([transforms.Resize(target), transforms.ToTensor(),
                                      transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        self.wsi = None
        self.pid = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int):
        import openslide

        if self.wsi is None or self.pid != os.getpid():  # one handle per worker process
            self.wsi, self.pid = openslide.OpenSlide(self.path), os.getpid()
        x, y = self.coords[i]
        img = self.wsi.read_region((int(x), int(y)), self.level, (self.size, self.size)).convert("RGB")
        return self.tf(img)


def clam_style(path: str, grid, workers: int, encoder=None, batch_size: int = 256) -> float:
    """Seconds for CLAM's data path over ``grid``; ``encoder`` (optional) runs on every batch with the
    same compute as in slidechat (``tiny_test`` sees its 112-px stride-2 input, as its own preprocess
    makes it)."""
    import torch
    from torch.utils.data import DataLoader

    ds = ClamStyleBag(path, grid.coords, grid.read_level, grid.read_size, grid.patch_size)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers,
                        multiprocessing_context=mp.get_context("fork") if workers else None)
    tiny = encoder is not None and encoder.name == "tiny_test"
    t = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            if encoder is not None:
                encoder.encode(batch[:, :, ::2, ::2].contiguous() if tiny else batch)
    return time.perf_counter() - t


# ----------------------------------------------------------------------------------------------
# (c) slidechat


def _free_encoder():
    import torch

    class FreeEncoder(PatchEncoder):
        name = "free"
        embed_dim = 8

        def forward(self, patches: torch.Tensor) -> torch.Tensor:
            return torch.zeros(patches.shape[0], 8)

    return FreeEncoder()


def slidechat_pipeline(path: str, encoder, out: Path, **options) -> Tuple[float, Dict[str, float]]:
    t = time.perf_counter()
    s = extract_slides([path], out, encoder=encoder, overwrite=True, progress=False, save_qc=True, **options)
    dt = time.perf_counter() - t
    if s["failed"]:
        raise SystemExit(f"pipeline failed: {s['failed']}")
    return dt, next(iter(s["timings"].values()))


# ----------------------------------------------------------------------------------------------
# reader CPU time vs bare decode (issue 15)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def reader_cpu_in_process(path: str, grid) -> float:
    """(r1) CPU seconds of one ``PatchReader`` (the pipeline's defaults) reading every patch of ``grid``
    in this process, slide open and pixel-identity self-check included."""
    reader = PatchReader(path, grid, batch_size=64, cache_mb=128)
    t = time.process_time()
    try:
        for b in reader.batches:
            reader.read(b)
    finally:
        reader.close()
    return time.process_time() - t


def reader_cpu_pipeline(path: str, out: Path) -> Tuple[float, float, int, int]:
    """(rN) the whole pipeline with a free encoder: ``(CPU seconds of all reader processes, CPU seconds
    of this process, reader processes, patches those processes read)``. The main process reads the
    16-patch probe itself; every other patch is read by the reader processes (forked, then reaped, so
    ``RUSAGE_CHILDREN`` holds all of their CPU time)."""
    c0, p0 = _children_cpu(), time.process_time()
    _, tm = slidechat_pipeline(path, _free_encoder(), out)
    children, main = _children_cpu() - c0, time.process_time() - p0
    n = int(round(tm["patches_per_s"] * tm["total_s"]))
    readers = int(tm["readers"])
    return children, main, readers, n - 16 if readers else 0


def reader_cpu_split(path: str, grid, readers: int) -> Tuple[float, float]:
    """``(CPU seconds per patch after the start, CPU seconds per reader process to start)`` of the reader
    processes the pipeline runs (``stream_batches`` over a reader of the opened, checked slide, as the
    pipeline hands it over), from two runs: the first ``SLOTS_PER_READER`` batches of each reader, then
    every batch. The difference per patch is the steady cost; what the short run costs beyond it is the
    fixed cost of a reader (fork, exit, first touch of its slots and tile buffers), paid once per slide."""
    with Slide(path) as slide:
        reader = PatchReader(path, grid, batch_size=64, cache_mb=128, slide=slide)
        head = reader.batches[:SLOTS_PER_READER * readers]
        cpu = []
        for batches in (head, reader.batches):
            c0 = _children_cpu()
            for _ in stream_batches(reader, batches, readers):
                pass
            cpu.append(_children_cpu() - c0)
    n_head, n_all = sum(len(b) for b in head), len(grid)
    marginal = (cpu[1] - cpu[0]) / max(n_all - n_head, 1)
    return marginal, (cpu[0] - marginal * n_head) / readers


def run_ratio(path: Path, work: Path, repeats: int, procs: int) -> Dict[str, list]:
    """Per repeat, interleaved: bare decode in 1 and in ``procs`` processes, r1, rN; CPU seconds per
    patch. rN is compared with the decode split over as many processes as the pipeline's readers, so
    both run under the same concurrency (2 busy processes on 2 cores cost more CPU per tile than 1)."""
    grid = plan(path)
    n = len(grid)
    rows: Dict[str, list] = {k: [] for k in ("dec", "decN", "r1", "rN", "main", "readers", "tiles", "rNm",
                                             "fixed")}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for _ in range(repeats):
            dec, ntiles = decode_cpu(str(path), grid)
            rows["dec"].append(dec / n)
            rows["tiles"].append(ntiles)
            c0 = _children_cpu()
            decode_limit(str(path), grid, procs)
            rows["decN"].append((_children_cpu() - c0) / n)
            rows["r1"].append(reader_cpu_in_process(str(path), grid) / n)
            children, main, readers, n_read = reader_cpu_pipeline(str(path), Path(tmp) / "free")
            rows["rN"].append(children / max(n_read, 1))
            rows["main"].append(main / n)
            rows["readers"].append(readers)
            marginal, fixed = reader_cpu_split(str(path), grid, max(readers, 1))
            rows["rNm"].append(marginal)
            rows["fixed"].append(fixed)
    rows["n"] = [n]
    return rows


def print_ratio(specs: Sequence[str], work: Path, repeats: int, procs: int) -> None:
    """The table of reader CPU / bare-decode CPU. On a shared machine the CPU time of the same work
    varies by 1.5x between runs (cache and core contention); interference only adds, so the ratio of
    the *minimum* times over the repeats is the robust figure, given beside the min / median of the
    per-repeat ratios."""
    print("\n### Reader CPU time vs bare decode (CPU ms per patch, minimum over "
          f"{repeats} interleaved repeats; ratios: of the minima, then min / median of the per-repeat ratios)")
    print(f"| slide | patches | tiles | decode, 1 process | (r1) one reader, in process | r1 / decode | "
          f"decode, {procs} processes | (rN) reader processes, pipeline, free encoder | rN / decode | "
          "main process | rN after the start (steady) | steady / decode | start, ms per reader process |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec in specs:
        w, h, mag = _parse_slide(spec)
        r = run_ratio(make_slide(work, w, h, mag), work, repeats, procs)
        q1 = [a / d for a, d in zip(r["r1"], r["dec"])]
        qN = [a / d for a, d in zip(r["rN"], r["decN"])]
        ms = lambda v: f"{1e3 * min(v):.2f}"  # noqa: E731
        print(f"| {w}x{h} @{mag:g}x | {r['n'][0]} | {r['tiles'][0]} | {ms(r['dec'])} | {ms(r['r1'])} | "
              f"**{min(r['r1']) / min(r['dec']):.2f}x** ({min(q1):.2f}x / {_med(q1):.2f}x) | {ms(r['decN'])} | "
              f"{ms(r['rN'])} ({r['readers'][0]} readers) | **{min(r['rN']) / min(r['decN']):.2f}x** "
              f"({min(qN):.2f}x / {_med(qN):.2f}x) | {ms(r['main'])} | {ms(r['rNm'])} | "
              f"**{min(r['rNm']) / min(r['decN']):.2f}x** | {_med(r['fixed']) * 1e3:.0f} (median) |", flush=True)
        print(f"  per repeat (ms/patch): decode={_ms_list(r['dec'])} r1={_ms_list(r['r1'])} "
              f"decodeN={_ms_list(r['decN'])} rN={_ms_list(r['rN'])} steady={_ms_list(r['rNm'])} "
              f"start ms/reader={_ms_list(r['fixed'])}", flush=True)


def _ms_list(v: Sequence[float]) -> List[float]:
    return [round(1e3 * x, 2) for x in v]


def print_large(spec: str, name: str, work: Path) -> None:
    """One large encoder end to end on CPU (random weights) beside the free encoder and the decode
    limit, on a small slide: where compute takes over."""
    import torch

    w, h, mag = _parse_slide(spec)
    path = make_slide(work, w, h, mag)
    grid = plan(path)
    n = len(grid)
    enc = build_encoder(name, load_weights=False)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        dt_a, _ = decode_limit(str(path), grid, os.cpu_count() or 1)
        # reading in the main process leaves every core to the encoder's threads (the probe would
        # otherwise time the large encoder on one thread, on most of these few patches)
        dt_free, _ = slidechat_pipeline(str(path), _free_encoder(), Path(tmp) / "free", num_workers=0)
        dt_large, tm = slidechat_pipeline(str(path), enc, Path(tmp) / "large", num_workers=0)
    print(f"\n### Large encoder on CPU: {name} (random weights, {sum(p.numel() for p in enc.parameters()) / 1e6:.0f} M "
          f"parameters, torch {torch.get_num_threads()} threads)")
    print("| slide | patches | (a) tile-decode limit | (c0) slidechat, free encoder | (c) slidechat, "
          f"{name} | c/c0 | encode s per patch |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {w}x{h} @{mag:g}x | {n} | {_f(n / dt_a)} | {_f(n / dt_free)} | {_f(n / dt_large)} | "
          f"{dt_free / dt_large:.1%} | {tm['encode_s'] / n:.2f} |")
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in tm.items()), flush=True)


def _parse_slide(spec: str) -> Tuple[int, int, float]:
    size, mag = spec.split("@")
    w, h = (int(v) for v in size.split("x"))
    return w, h, float(mag)


# ----------------------------------------------------------------------------------------------


def make_slide(work: Path, width: int, height: int, mag: float) -> Path:
    path = work / f"bench_{width}x{height}_{mag:g}x.svs"
    if not path.is_file():
        t = time.perf_counter()
        write_slide(path, SlideSpec(path.stem, "tumor", width, height, 10 / mag, 7))
        print(f"wrote {path} in {time.perf_counter() - t:.0f}s", flush=True)
    return path


def plan(path: Path):
    with Slide(path) as s:
        return plan_patches(s, segment_tissue(s), resolve_resolution(s), 20.0, None, 224, 0.5)


def build(name: str, work: Path):
    import torch

    if name == "resnet50_trunc":
        ckpt = work / "resnet50_random.pth"
        if not ckpt.is_file():
            from torchvision.models import resnet50

            torch.save(resnet50(weights=None).state_dict(), ckpt)
        return build_encoder(name, ckpt)
    return build_encoder(name)


def run_case(path: Path, enc_name: str, work: Path, workers: int, repeats: int) -> Dict[str, list]:
    grid = plan(path)
    enc = build(enc_name, work)
    free = _free_encoder()
    n = len(grid)
    rows: Dict[str, list] = {"a": [], "b0": [], "b": [], "c0": [], "c": [], "tiles": [], "timings": []}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for _ in range(repeats):
            dt, ntiles = decode_limit(str(path), grid, workers)
            rows["a"].append(n / dt)
            rows["tiles"].append(ntiles)
            rows["b0"].append(n / clam_style(str(path), grid, workers, None))
            rows["b"].append(n / clam_style(str(path), grid, workers, enc))
            dt, _ = slidechat_pipeline(str(path), free, Path(tmp) / "free")
            rows["c0"].append(n / dt)
            dt, tm = slidechat_pipeline(str(path), enc, Path(tmp) / "enc")
            rows["c"].append(n / dt)
            rows["timings"].append(tm)
    rows["n"] = [n]
    rows["grid"] = [(grid.read_level, grid.read_size, grid.patch_size)]
    return rows


def _med(v: Sequence[float]) -> float:
    return statistics.median(v) if v else float("nan")


def _f(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.2f}"


def print_throughput(a: argparse.Namespace, work: Path) -> None:
    """(a)/(b0)/(b)/(c0)/(c) patches/s per slide and encoder, with per-repeat figures."""
    print("| slide | encoder | patches | tiles decoded | (a) tile-decode limit | (b0) CLAM-style, free encoder | "
          "(b) CLAM-style + encoder | (c0) slidechat, free encoder | (c) slidechat end to end | c/b | c/b0 | "
          "c0/b0 | c/a | c0/a |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    details = []
    for enc_name in a.encoders:
        for spec in (a.slides if enc_name == "tiny_test" else a.resnet_slides):
            w, h, mag = _parse_slide(spec)
            path = make_slide(work, w, h, mag)
            r = run_case(path, enc_name, work, a.workers,
                         a.repeats if enc_name == "tiny_test" else a.resnet_repeats)
            cb = [c / b for c, b in zip(r["c"], r["b"])]
            cb0 = [c / b for c, b in zip(r["c"], r["b0"])]
            c0b0 = [c / b for c, b in zip(r["c0"], r["b0"])]
            ca = [c / x for c, x in zip(r["c"], r["a"])]
            c0a = [c / x for c, x in zip(r["c0"], r["a"])]
            print(f"| {w}x{h} @{mag}x | {enc_name} | {r['n'][0]} | {r['tiles'][0]} | {_f(_med(r['a']))} | "
                  f"{_f(_med(r['b0']))} | {_f(_med(r['b']))} | {_f(_med(r['c0']))} | {_f(_med(r['c']))} | "
                  f"{_med(cb):.2f}x | {_med(cb0):.2f}x | {_med(c0b0):.2f}x | {_med(ca):.0%} | {_med(c0a):.0%} |",
                  flush=True)
            details.append((spec, enc_name, r, cb, ca))
    print("\nper-repeat figures (patches/s) and slidechat's own timing breakdown (last repeat):")
    for spec, enc_name, r, cb, ca in details:
        print(f"- {spec} {enc_name}: a={[_f(v) for v in r['a']]} b0={[_f(v) for v in r['b0']]} "
              f"b={[_f(v) for v in r['b']]} "
              f"c0={[_f(v) for v in r['c0']]} c={[_f(v) for v in r['c']]} "
              f"c/b={[round(v, 2) for v in cb]} c/a={[round(v, 2) for v in ca]}")
        tm = r["timings"][-1]
        print("  " + ", ".join(f"{k} {v:.2f}" for k, v in tm.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="work_dirs/bench_extract")
    ap.add_argument("--part", nargs="+", choices=["throughput", "ratio", "large"],
                    default=["throughput", "ratio", "large"])
    ap.add_argument("--slides", nargs="+", default=["40000x30000@40", "20000x15000@20"],
                    help="WIDTHxHEIGHT@MAG synthetic slides for tiny_test and the reader CPU ratio")
    ap.add_argument("--resnet-slides", nargs="+", default=["8000x6000@40", "4000x3000@20"],
                    help="smaller slides for resnet50_trunc (compute-bound on CPU)")
    ap.add_argument("--resnet-repeats", type=int, default=1)
    ap.add_argument("--encoders", nargs="+", default=["tiny_test", "resnet50_trunc"])
    ap.add_argument("--large-encoder", default="uni2_h", help="for --part large (random weights)")
    ap.add_argument("--large-slide", default="5600x4200@40",
                    help="small slide for --part large (32 tissue patches: a ViT-H/14 costs 2-3 s per patch "
                         "on 2 CPU cores, ~75 s in all)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="processes for (a) and DataLoader workers for (b) (default: all cores)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of (a)-(c) and of the CPU ratio")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    import slidechat

    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start, "
          f"torch {torch.__version__} threads {torch.get_num_threads()}, no GPU used; "
          f"slidechat from {Path(slidechat.__file__).parent}")
    if "throughput" in a.part:
        print_throughput(a, work)
    if "ratio" in a.part:
        print_ratio(a.slides, work, a.repeats, a.workers)
    if "large" in a.part:
        print_large(a.large_slide, a.large_encoder, work)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

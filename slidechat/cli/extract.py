"""``slidechat extract-features``: [slides] raw slides -> patch features (H5, CSV, QC PNG); cytology: ``screen``."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from slidechat.cli.args import add_slide_run_arguments

logger = logging.getLogger("slidechat.extract")

EPILOG = """\
outputs (under --out; --layout trident puts the first three under <mag>x_<size>px_0px_overlap/ as
features_<encoder>/, csv_<encoder>/ and qc/, TRIDENT's folders and names):
  h5_files/<slide>.h5   datasets coords (N x 2 int64, level-0 top-left x,y) and features (N x D float32);
                        CLAM/TRIDENT attributes on coords; encoder preset, version, preprocessing,
                        output rule and checkpoint sha256 on the root
  csv/<slide>.csv       SlideChat layout (with --save-csv): header 0..D-1, %.4f, no coordinates
  qc/<slide>.png        thumbnail with tissue contour and patch grid
  failures.csv          slide,path,stage,reason (failures_rank<r>.csv when sharded)

examples:
  slidechat extract-features slides/ --out work_dirs/feats --encoder conch_v1 \\
      --checkpoint ckpts/conch/pytorch_model.bin --save-csv
  slidechat extract-features slides/ --out job --encoder uni2_h --checkpoint uni2-h.bin --layout trident
  slidechat extract-features --list-encoders
  slidechat extract-features "data/**/*.svs" --out feats --encoder tiny_test --limit 4
  torchrun --nproc_per_node=4 tools/extract_features.py list.csv --out feats --encoder conch_v1 ...
Slides without MPP/objective metadata need --base-mpp or --base-magnification (a TIFF whose only
resolution is a default DPI tag counts as without); a slide whose objective power and MPP disagree
is refused until --mpp-source says which to trust. Each slide's log line and H5 (timing_* attributes)
say where its time went: open, segment, patch plan, read, encode, write.
Rerunning skips slides whose H5 exists (--overwrite to redo). Nothing is ever downloaded."""


class _ListEncoders(argparse.Action):
    """``--list-encoders``: print the registry's table and exit 0, needing no slides or --out."""

    def __init__(self, option_strings: Any, dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        # lazy: the registry imports torch and timm; only this flag (and extraction) needs them
        from slidechat.features.encoders import format_preset_table, preset_table

        print(format_preset_table(preset_table()))
        parser.exit(0)


class _EncoderHelp(str):
    """The ``--encoder`` help, with the registered names read only when the help is shown.

    argparse reads an action's ``help`` only to format ``extract-features --help``, so ``slidechat
    --help`` (and every run) does not import the registry and torch for it."""

    def __new__(cls) -> "_EncoderHelp":
        return super().__new__(cls, "encoder name")

    def __mod__(self, params: Any) -> str:  # argparse formats "%(default)s" with this
        # lazy: the registry imports torch and timm, needed only when this help is printed
        from slidechat.features.encoders import list_encoders

        names = ", ".join(list_encoders())
        return (f"one of: {names} (default: {params['default']}; table: --list-encoders). Every "
                "encoder but tiny_test loads local --checkpoint weights")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--list-encoders", action=_ListEncoders,
                   help="print the encoders (name, dim, input, magnification, licence) and exit")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="slide file(s), folder(s), glob(s) (quote them), or a CSV (column 'path' or "
                        "'slide_path') / text list of slide paths")
    p.add_argument("--out", "-o", required=True, help="output folder")
    g = p.add_argument_group("encoder")
    g.add_argument("--encoder", default="conch_v1", help=_EncoderHelp())
    g.add_argument("--checkpoint", help="local weights file for the encoder (required except tiny_test; "
                                        "the reference's own key names; nothing is downloaded)")
    g = p.add_argument_group("patches")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--magnification", type=float, default=20.0,
                   help="target magnification (default: %(default)s; 10/mag µm/px)")
    x.add_argument("--mpp", type=float, help="target µm/px instead of --magnification")
    g.add_argument("--patch-size", type=int, default=224, help="patch side at the target (default: 224)")
    g.add_argument("--base-mpp", type=float,
                   help="level-0 µm/px for slides without (trustworthy) metadata; the file's metadata wins "
                        "unless --override-metadata")
    g.add_argument("--base-magnification", type=float,
                   help="level-0 magnification for slides without metadata")
    g.add_argument("--override-metadata", action="store_true",
                   help="use --base-mpp/--base-magnification even where the file states a resolution")
    # values checked by the library (wsi.slide.MPP_SOURCES, features.extract.LAYOUTS) before any work:
    # importing them here would load numpy/torch for `slidechat --help`
    g.add_argument("--mpp-source", default="auto", metavar="auto|mpp|objective",
                   help="which metadata field sets the scan's resolution: auto = openslide.mpp-x, and a "
                        "slide whose objective power disagrees with it is refused (failures.csv); mpp or "
                        "objective = that field whenever the file states it (default: %(default)s)")
    g.add_argument("--tissue-threshold", type=float, default=0.5,
                   help="keep patches with at least this tissue fraction (default: %(default)s)")
    g = p.add_argument_group("tissue segmentation")
    g.add_argument("--no-tissue-seg", action="store_true", help="use the whole image (no segmentation)")
    g.add_argument("--seg-threshold", type=int,
                   help="fixed saturation threshold 0-255 (default: Otsu, floored at 15)")
    g.add_argument("--seg-downsample", type=float, help="mask downsample (default: auto, ~1-2k px mask)")
    g.add_argument("--seg-min-tissue-area", type=float, default=256 * 256,
                   help="drop tissue regions smaller than this, level-0 px² (default: %(default)g)")
    g.add_argument("--seg-min-hole-area", type=float, default=128 * 128,
                   help="fill holes smaller than this, level-0 px² (default: %(default)g)")
    g = p.add_argument_group("run")
    g.add_argument("--layout", default="slidechat", metavar="slidechat|trident",
                   help="output folders: slidechat (h5_files/, csv/, qc/) or trident "
                        "(<mag>x_<size>px_0px_overlap/features_<encoder>/, TRIDENT's) (default: %(default)s)")
    g.add_argument("--save-csv", action="store_true", help="also write SlideChat CSVs")
    g.add_argument("--no-qc", action="store_true", help="skip the QC PNGs")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--num-workers", type=_workers, default=None, metavar="N|auto",
                   help="patch-reading processes (default: auto, balanced against the encoder's cost "
                        "from a probe batch; 0 = read in the main process)")
    g.add_argument("--cache-mb", type=float, default=128,
                   help="OpenSlide tile cache per reader process, MB (default: %(default)g)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    g.add_argument("--no-amp", action="store_true", help="no bf16 autocast on GPU")
    add_slide_run_arguments(g, overwrite_help="redo slides whose H5 exists")


def _workers(v: str) -> Any:
    if v == "auto":
        return None
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {v!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("extract-features", help="[slides] raw slides -> patch features (H5/CSV)",
                              description=__doc__.splitlines()[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: slidechat --help must not import torch (the encoders, via apps.extract)
    from slidechat.apps.extract import check_run, extract_slides
    from slidechat.features.inputs import collect_slide_paths  # lazy: as above, the CLI starts light

    options = dict(
        layout=args.layout, target_magnification=None if args.mpp else args.magnification,
        target_mpp=args.mpp, patch_size=args.patch_size, base_mpp=args.base_mpp,
        base_magnification=args.base_magnification, override_metadata=args.override_metadata,
        mpp_source=args.mpp_source, cache_mb=args.cache_mb, tissue_threshold=args.tissue_threshold,
        no_tissue_seg=args.no_tissue_seg, seg_threshold=args.seg_threshold,
        seg_downsample=args.seg_downsample, seg_min_tissue_area=args.seg_min_tissue_area,
        seg_min_hole_area=args.seg_min_hole_area, batch_size=args.batch_size,
        num_workers=args.num_workers, device=args.device, amp=not args.no_amp,
        progress=not args.no_progress)
    # before listing slides or loading an encoder: a bad --out, encoder name or --checkpoint fails at once
    check_run(args.out, args.encoder, args.checkpoint, **options)
    paths = collect_slide_paths(args.inputs, recursive=args.recursive)
    summary = extract_slides(
        paths, args.out, encoder=args.encoder, checkpoint=args.checkpoint, save_csv=args.save_csv,
        save_qc=not args.no_qc, overwrite=args.overwrite, rank=args.rank, world_size=args.world_size,
        limit=args.limit, **options)
    for f in summary["failed"]:
        logger.error("FAILED %s [%s]: %s", f["slide"], f["stage"], f["reason"])
    return 1 if summary["failed"] else 0

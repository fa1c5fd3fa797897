"""``slidechat screen``: cytology slides -> field scores from the copilot's option probabilities ->
slide scores, ranking, AUC (with labels), heatmaps, galleries and reports."""

from __future__ import annotations

import argparse
import logging
from functools import partial
from typing import Any

from slidechat.cli.args import add_slide_run_arguments, add_trust_remote_code_argument
from slidechat.data.vocabulary import GROUND_ABNORMAL_QUESTION, LETTERS, SCREENING_QUESTION
from slidechat.evaluation.screening import AGGREGATORS
from slidechat.features.inputs import collect_slide_paths
from slidechat.utils.errors import SlideChatError
from slidechat.utils.outputs import check_output_folder

logger = logging.getLogger("slidechat.screen")

EPILOG = """\
outputs (under --out):
  fields/<slide>.csv     one row per cellular field: level-0 x,y,size, cellular/nuclear fraction, score
                         (= P(abnormal option)), p_A.., option_mass, grounded cells (level-0 boxes, JSON)
  fields/<slide>.json    settings, grid, timings;  heatmaps/<slide>.png, galleries/<slide>.png,
  reports/<slide>.md     per-slide pictures and report
  slides.csv             slide, rank, score, n_fields (+ label, call)
  metrics.json, roc.png  with --labels: AUC + bootstrap 95% CI, threshold, sensitivity, specificity
  failures.csv           slide,path,stage,reason (failures_rank<r>.csv when sharded)

aggregators (--aggregator): max | topk_mean (default, --top-k 5) | fraction_above (--field-threshold)
  | count_grounded (needs --ground-top N or --ground-all)

examples:
  slidechat screen slides/ --model_name_or_path work_dirs/cyto_tiny/export --out work_dirs/screen \\
      --labels slides/labels.csv --ground-top 4
  slidechat screen --reaggregate work_dirs/screen --aggregator max --labels slides/labels.csv
  torchrun --nproc_per_node=4 -m slidechat.cli.main screen list.csv --model_name_or_path M --out S
    (then: slidechat screen --reaggregate S --labels labels.csv)
Rerunning skips slides whose fields/<slide>.csv exists (--overwrite to redo). Nothing is downloaded."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="slide file(s), folder(s), glob(s) or a CSV/text list (as extract-features)")
    p.add_argument("--out", "-o", help="output folder")
    p.add_argument("--reaggregate", metavar="OUT",
                   help="no model: recompute slide scores/metrics from OUT/fields/*.csv")
    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", "--model", help="Qwen2-VL folder (tiny, base, CytoChat, exported)")
    g.add_argument("--adapter_name_or_path", help="LoRA adapter folder to merge")
    add_trust_remote_code_argument(g)
    g.add_argument("--allow-partial", "--allow_partial", action="store_true",
                   help="accept a model folder whose weights files lack some of the model's weights (they "
                        "stay random) or hold unexpected ones, with a warning; by default that is an error")
    g.add_argument("--image_max_pixels", type=int, default=768 * 768)
    g.add_argument("--image_min_pixels", type=int, default=32 * 32)
    g.add_argument("--prompt", default=SCREENING_QUESTION, help="screening question (default: %(default)r)")
    g.add_argument("--options", default="Normal,Abnormal",
                   help="answer options in the prompt's order, comma-separated (default: %(default)s)")
    g.add_argument("--abnormal-options", default="B",
                   help="letters of the options that count as abnormal (default: %(default)s)")
    g.add_argument("--ground-top", type=int, default=0,
                   help="ground abnormal cells in the N highest-scoring fields per slide (default: 0)")
    g.add_argument("--ground-all", action="store_true", help="ground every kept field (slow)")
    g.add_argument("--ground-prompt", default=GROUND_ABNORMAL_QUESTION)
    g.add_argument("--max_new_tokens", type=int, default=256, help="for grounding answers")
    g.add_argument("--batch-size", "--batch_size", type=int, default=8)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g = p.add_argument_group("fields")
    g.add_argument("--field-size", type=int, default=512, help="field side in px (default: 512)")
    g.add_argument("--mpp", type=float, default=0.5, help="field µm/px (default: 0.5)")
    g.add_argument("--base-mpp", type=float, help="level-0 µm/px for slides without metadata")
    g.add_argument("--base-magnification", type=float, help="level-0 magnification without metadata")
    g.add_argument("--min-cellular", type=float, default=0.02,
                   help="keep fields whose cellular fraction is >= this (default: %(default)s)")
    g.add_argument("--od-threshold", type=float, default=0.04,
                   help="optical density vs glass above which a pixel is cellular (default: %(default)s)")
    g = p.add_argument_group("aggregation and metrics")
    g.add_argument("--aggregator", default="topk_mean", choices=AGGREGATORS)
    g.add_argument("--top-k", type=int, default=5, help="k of topk_mean (default: 5)")
    g.add_argument("--field-threshold", type=float, default=0.5,
                   help="field score threshold of fraction_above and the report (default: 0.5)")
    g.add_argument("--labels", help="CSV slide,label (normal/abnormal): AUC, CI, sensitivity/specificity")
    g.add_argument("--threshold", type=float,
                   help="slide-score threshold for the calls (default: Youden's with --labels)")
    g.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the AUC CI")
    g.add_argument("--gallery-k", type=int, default=8, help="fields in each gallery (default: 8)")
    g = p.add_argument_group("run")
    add_slide_run_arguments(g, overwrite_help="redo slides already screened")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("screen", help="[cytology] cytology slides -> field scores -> slide scores/AUC",
                              description=__doc__.splitlines()[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def _options(args: argparse.Namespace) -> Any:
    """The command line as :class:`slidechat.apps.screening.ScreenOptions` (option letters checked)."""
    # lazy: apps.screening imports torch and transformers; `slidechat --help` must not wait for them
    from slidechat.apps.screening import ScreenOptions

    options = tuple(o.strip() for o in args.options.split(",") if o.strip())
    ab = []
    for letter in args.abnormal_options.replace(",", " ").split():
        i = LETTERS.find(letter.strip().upper())
        if len(letter.strip()) != 1 or i < 0 or i >= len(options):
            raise SlideChatError(f"--abnormal-options: {letter!r} is not one of the option letters "
                                 f"{LETTERS[:len(options)]}")
        ab.append(i)
    return ScreenOptions(field_size=args.field_size, target_mpp=args.mpp, base_mpp=args.base_mpp,
                         base_magnification=args.base_magnification, min_cellular=args.min_cellular,
                         od_threshold=args.od_threshold, batch_size=args.batch_size, prompt=args.prompt,
                         options=options, abnormal_options=tuple(ab),
                         image_max_pixels=args.image_max_pixels, image_min_pixels=args.image_min_pixels,
                         ground_top=args.ground_top, ground_all=args.ground_all,
                         ground_prompt=args.ground_prompt, max_new_tokens=args.max_new_tokens,
                         top_k=args.top_k, aggregator=args.aggregator,
                         field_threshold=args.field_threshold, slide_threshold=args.threshold,
                         n_boot=args.n_boot, gallery_k=args.gallery_k, device=args.device,
                         trust_remote_code=args.trust_remote_code, allow_partial=args.allow_partial,
                         progress=not args.no_progress)


SCREEN_LAYOUT = ("fields", "heatmaps", "galleries", "reports", "slides.csv", "metrics.json", "roc.png")


def run(args: argparse.Namespace) -> int:
    # lazy: apps.screening imports torch and transformers; `slidechat --help` must not wait for them
    from slidechat.apps.screening import reaggregate, screen_slides

    opts = _options(args)
    if args.reaggregate:
        if args.inputs:
            raise SlideChatError("--reaggregate takes no slide inputs (it reads OUT/fields/*.csv)")
        res = reaggregate(args.reaggregate, labels=args.labels, opts=opts)
        _print(res)
        return 0
    if not args.inputs or not args.out:
        raise SlideChatError("give slide INPUTs and --out (or --reaggregate OUT)")
    if not args.model_name_or_path:
        raise SlideChatError("--model_name_or_path is required to screen slides")
    # lazy: the runner imports torch (through the patch reader); `slidechat --help` must not wait for it
    from slidechat.apps.runner import earlier_run_entries

    # the output-folder rule before the model loads: a user's folder (its failures.csv) is never written into
    legacy = partial(earlier_run_entries, layout=SCREEN_LAYOUT)
    check_output_folder(args.out, "screening", legacy=legacy, create=True,
                        refuse_hint="screen into a new or empty folder, or an earlier screening's --out "
                                    "to resume it")
    paths = collect_slide_paths(args.inputs, recursive=args.recursive)
    summary = screen_slides(paths, args.out, args.model_name_or_path, args.adapter_name_or_path,
                            labels=args.labels, opts=opts, overwrite=args.overwrite, rank=args.rank,
                            world_size=args.world_size, limit=args.limit)
    _print(summary)
    for f in summary["failed"]:
        logger.error("FAILED %s [%s]: %s", f["slide"], f["stage"], f["reason"])
    return 1 if summary["failed"] else 0


def _print(res: dict) -> None:
    scores = res.get("scores") or {}
    for rank, s in enumerate(sorted(scores, key=lambda k: (-scores[k], k)), 1):
        print(f"{rank}\t{s}\t{scores[s]:.4f}")
    if res.get("metrics_line"):
        print(res["metrics_line"])

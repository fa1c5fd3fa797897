"""``slidechat eval``: score model outputs.

SlideBench output CSVs (``mcq``, ``caption``) and cytology predictions (``mcq``, ``grounding``,
``region``, ``report``): ``slidechat infer`` JSONL, LLaMA-Factory's ``generated_predictions.jsonl`` or
CytoChat's benchmark ``.xlsx``. For cytology files the task is detected per row from the prompt; a
file mixing tasks, or rows fitting none, is refused unless ``--task`` says which rows to score.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from slidechat.evaluation.cytology_io import SCORER_TASKS
from slidechat.utils.atomic import atomic_path
from slidechat.utils.errors import SlideChatError

logger = logging.getLogger("slidechat.eval")


def register(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser("eval", help="[slides, cytology] score SlideBench / cytology outputs (accuracy, grounding, "
                                           "referring expressions, report metrics)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="eval_task", metavar="TASK")
    sub.required = True
    for add in (_add_mcq, _add_caption, _add_grounding, _add_region, _add_report, _add_cytology):
        add(sub)


def _add_mcq(sub: "argparse._SubParsersAction") -> None:
    m = sub.add_parser("mcq", help="multiple-choice accuracy (overall, per category, per tumor/task; "
                                   "cytology: per task and number of classes)")
    m.add_argument("pred_csv", type=Path, metavar="FILE",
                   help="SlideBench output CSV with Answer and Output (and Pred if present), or cytology "
                        "predictions (.jsonl / CytoChat .xlsx)")
    m.add_argument("--reparse", action="store_true", help="ignore the Pred column and parse Output again")
    m.add_argument("--group-by", nargs="*", default=None, metavar="COLUMN",
                   help="group columns (default: those of Broad Category, Narrow Category, Tumor, Task "
                        "present)")
    _outputs(m)
    _cytology_options(m, "mcq")
    m.set_defaults(func=run_mcq)


def _add_caption(sub: "argparse._SubParsersAction") -> None:
    c = sub.add_parser("caption", help="BLEU-1..4, ROUGE-L and METEOR against reference captions")
    c.add_argument("pred_csv", type=Path, help="output CSV with a prediction and a reference column")
    c.add_argument("--ref-column", default=None,
                   help="reference text column (default: first of Caption, Report, Answer, Reference, "
                        "Text)")
    c.add_argument("--pred-column", default="Output", help="prediction column (default: Output)")
    c.add_argument("--per-row-csv", type=Path, default=None,
                   help="also write the input rows with one column per metric")
    _outputs(c)
    _cytology_options(c, "report")
    c.set_defaults(func=run_caption)


def _add_grounding(sub: "argparse._SubParsersAction") -> None:
    g = sub.add_parser("grounding", help="cytology multi-cell grounding: Hungarian-matched precision / "
                                         "recall / F1 at IoU 0.3, 0.5, 0.75, per class, count error")
    g.add_argument("pred_file", type=Path, metavar="FILE", help="predictions (.jsonl / CytoChat .xlsx)")
    _image_options(g)
    g.add_argument("--iou", type=float, nargs="+", default=None, metavar="T",
                   help="IoU thresholds (default: 0.3 0.5 0.75; 0.5 is always included)")
    _alias_option(g)
    _outputs(g)
    _cytology_options(g, "grounding")
    g.set_defaults(func=run_cytology, scorer="grounding")


def _add_region(sub: "argparse._SubParsersAction") -> None:
    r = sub.add_parser("region", help="cytology referring expressions: region -> class accuracy "
                                      "(confusion table), description -> region at IoU >= 0.5")
    r.add_argument("pred_file", type=Path, metavar="FILE", help="predictions (.jsonl / CytoChat .xlsx)")
    _alias_option(r)
    _outputs(r)
    _cytology_options(r, "region")
    r.set_defaults(func=run_cytology, scorer="region")


def _add_report(sub: "argparse._SubParsersAction") -> None:
    t = sub.add_parser("report", help="cytology reports / VQA: BLEU-1..4, ROUGE-L, METEOR per task")
    t.add_argument("pred_file", type=Path, metavar="FILE", help="predictions (.jsonl / CytoChat .xlsx)")
    _outputs(t)
    _cytology_options(t, "report")
    t.set_defaults(func=run_cytology, scorer="report")


def _add_cytology(sub: "argparse._SubParsersAction") -> None:
    a = sub.add_parser("cytology", help="every task in a cytology predictions file, each with its scorer "
                                        "(one section per task)")
    a.add_argument("pred_file", type=Path, metavar="FILE", help="predictions (.jsonl / CytoChat .xlsx)")
    _image_options(a)
    _alias_option(a)
    _file_options(a)
    _outputs(a)
    a.set_defaults(func=run_cytology_all)


def _outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-json", type=Path, default=None, help="write the full report as JSON")
    p.add_argument("--out-md", type=Path, default=None, help="write the Markdown report")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write <file stem>.<scorer>.json and .md into DIR")


def _cytology_options(p: argparse.ArgumentParser, scorer: str) -> None:
    # --task here selects cytology rows (SCORER_TASKS); a SlideBench CSV given --task is refused in
    # run_mcq/run_caption (_cytology_only) until the SlideBench path gives it a meaning of its own.
    p.add_argument("--task", default=None, choices=SCORER_TASKS[scorer],
                   help="cytology files: score the rows of this task (and rows fitting no task) as it; rows "
                        "of other tasks are left out and counted. Default: detect from the prompts and "
                        "refuse mixed files")
    _file_options(p)


def _file_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sheet", default=None, help="xlsx sheet name (default: the first)")
    p.add_argument("--drop-duplicates", action="store_true",
                   help="score rows that repeat an earlier row exactly only once")


def _image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=int, nargs=2, metavar=("W", "H"), default=None,
                   help="image size for Qwen2-VL native 0-1000 boxes when the images cannot be read")
    p.add_argument("--image-dir", type=Path, default=None,
                   help="folder that relative image paths are under (default: the file's folder)")
    p.add_argument("--box-format", default="region", choices=("region", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
                   help="grounding boxes (label and prediction) in this convention, converted to original-image "
                        "pixels: region = CytoChat <region> pixels (default; Qwen2-VL box tokens are read too), "
                        "qwen2_vl = <|box_start|>(x1,y1),(x2,y2)<|box_end|> on 0-1000, qwen2_5_vl = "
                        "bbox_2d JSON in pixels of the resized model input, qwen3_vl = bbox_2d JSON on 0-1000")
    p.add_argument("--image-max-pixels", "--image_max_pixels", type=int, default=768 * 768,
                   help="LLaMA-Factory's image_max_pixels the model ran with (qwen2_5_vl boxes; default 768*768)")
    p.add_argument("--image-min-pixels", "--image_min_pixels", type=int, default=32 * 32,
                   help="LLaMA-Factory's image_min_pixels (qwen2_5_vl boxes; default 32*32)")


def _alias_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alias", action="append", default=[], metavar="NAME=CLASS",
                   help="extra class-name alias (repeatable)")


def _report_paths(args: argparse.Namespace, path: Path, scorer: str):
    out_json, out_md = args.out_json, args.out_md
    if args.out is not None:
        # lazy: pandas/scipy/nltk take about a second; `slidechat --help` must not wait for them
        from slidechat.evaluation.cytology import default_report_paths

        j, m = default_report_paths(path, scorer, args.out)
        out_json, out_md = out_json or j, out_md or m
    return out_json, out_md


def _aliases(values) -> dict:
    out = {}
    for v in values or []:
        name, sep, cls = v.partition("=")
        if not sep or not name.strip() or not cls.strip():
            raise SlideChatError(f"--alias {v!r}: expected NAME=CLASS")
        out[name.strip()] = cls.strip()
    return out


def _box_kw(args: argparse.Namespace) -> dict:
    """``--box-format`` and the LLaMA-Factory scaling it needs (see slidechat.evaluation.boxes)."""
    for flag in ("image_max_pixels", "image_min_pixels"):
        if getattr(args, flag) <= 0:
            raise SlideChatError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be positive")
    return {"box_format": args.box_format,
            "resize": {"image_max_pixels": args.image_max_pixels, "image_min_pixels": args.image_min_pixels}}


def run_cytology_all(args: argparse.Namespace) -> int:
    # lazy: pandas/scipy/nltk take about a second; `slidechat --help` must not wait for them
    from slidechat.evaluation.cytology import score_all
    from slidechat.evaluation.tables import write_reports  # lazy: pandas (start-up)

    res = score_all(args.pred_file, sheet=args.sheet, drop_duplicates=args.drop_duplicates,
                    image_size=tuple(args.image_size) if args.image_size else None, image_dir=args.image_dir,
                    aliases=_aliases(args.alias), **_box_kw(args))
    out_json, out_md = _report_paths(args, args.pred_file, "cytology")
    write_reports(res.data, res.markdown, out_json, out_md)
    print(res.markdown, end="")
    return 0


def run_cytology(args: argparse.Namespace) -> int:
    # lazy: pandas/scipy/nltk take about a second; `slidechat --help` must not wait for them
    from slidechat.evaluation.cytology import score_file
    from slidechat.evaluation.grounding import IOU_THRESHOLDS  # lazy: pandas (start-up)
    from slidechat.evaluation.tables import write_reports  # lazy: pandas (start-up)

    path = getattr(args, "pred_file", None) or args.pred_csv
    kw = {}
    if args.scorer == "grounding":
        kw.update(image_size=tuple(args.image_size) if args.image_size else None, image_dir=args.image_dir,
                  iou_thresholds=tuple(args.iou) if args.iou else IOU_THRESHOLDS, **_box_kw(args))
    if args.scorer in ("grounding", "region"):
        kw.update(aliases=_aliases(args.alias))
    res = score_file(path, args.scorer, args.task, sheet=args.sheet, drop_duplicates=args.drop_duplicates,
                     **kw)
    out_json, out_md = _report_paths(args, path, args.scorer)
    write_reports(res.data, res.markdown, out_json, out_md)
    print(res.markdown, end="")
    return 0


def _cytology_only(args: argparse.Namespace, *names: str) -> None:
    for n in names:
        if getattr(args, n.replace("-", "_"), None):
            raise SlideChatError(f"--{n} applies to cytology files (.jsonl/.xlsx), not a SlideBench CSV",
                                 args.pred_csv)


def run_mcq(args: argparse.Namespace) -> int:
    # lazy: pandas/scipy/nltk take about a second; `slidechat --help` must not wait for them
    from slidechat.data.slidebench import read_csv_text
    from slidechat.evaluation.cytology import is_cytology_file  # lazy: pandas (start-up)
    from slidechat.evaluation.mcq import score_mcq  # lazy: pandas (start-up)
    from slidechat.evaluation.tables import write_reports  # lazy: pandas (start-up)
    if is_cytology_file(args.pred_csv):
        if args.reparse or args.group_by is not None:
            raise SlideChatError("--reparse/--group-by apply to SlideBench CSVs; cytology answers are always "
                                 "parsed and grouped by task and number of classes", args.pred_csv)
        args.scorer = "mcq"
        return run_cytology(args)
    _cytology_only(args, "task", "sheet", "drop-duplicates")
    df = read_csv_text(args.pred_csv)
    report = score_mcq(df, group_columns=args.group_by, source=str(args.pred_csv),
                       use_pred=not args.reparse)
    md = report.to_markdown()
    out_json, out_md = _report_paths(args, args.pred_csv, "mcq")
    write_reports(report.to_dict(), md, out_json, out_md)
    print(md, end="")
    return 0


def run_caption(args: argparse.Namespace) -> int:
    # lazy: pandas/scipy/nltk take about a second; `slidechat --help` must not wait for them
    from slidechat.data.slidebench import caption_columns, read_csv_text
    from slidechat.evaluation.captions import caption_metrics  # lazy: pandas (start-up)
    from slidechat.evaluation.cytology import is_cytology_file  # lazy: pandas (start-up)
    from slidechat.evaluation.tables import caption_markdown, write_reports  # lazy: pandas (start-up)
    if is_cytology_file(args.pred_csv):
        if args.ref_column or args.pred_column != "Output" or args.per_row_csv:
            raise SlideChatError("--ref-column/--pred-column/--per-row-csv apply to SlideBench CSVs; "
                                 "cytology files score 'predict' against 'label'", args.pred_csv)
        args.scorer = "report"
        return run_cytology(args)
    _cytology_only(args, "task", "sheet", "drop-duplicates")
    df = read_csv_text(args.pred_csv)
    cols = list(df.columns)
    ref = caption_columns(df, args.pred_csv, args.ref_column, args.pred_column)  # rows, ref, pred checked
    if "Error" in cols:
        failed = int((df["Error"].str.strip() != "").sum())
        if failed:
            logger.warning("%d row(s) have an Error (no output); they are scored as empty predictions",
                           failed)
    report = caption_metrics(df[args.pred_column].tolist(), df[ref].tolist(), per_row=True,
                             source=args.pred_csv, ref_name=f"{ref} column",
                             insist=args.ref_column is not None)
    report.update(source=str(args.pred_csv), pred_column=args.pred_column, ref_column=ref)
    md = caption_markdown(report, str(args.pred_csv))
    out_json, out_md = _report_paths(args, args.pred_csv, "caption")
    write_reports(report, md, out_json, out_md)
    if args.per_row_csv:
        rows = df.copy()
        for name in report["corpus"]:
            rows[name] = [f"{r[name]:.6f}" for r in report["rows"]]
        with atomic_path(args.per_row_csv) as tmp:
            rows.to_csv(tmp, index=False, lineterminator="\n")
    print(md, end="")
    return 0

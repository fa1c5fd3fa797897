"""``slidechat eval``: score a SlideBench output CSV (multiple-choice accuracy or caption metrics)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger("slidechat.eval")


def register(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser("eval", help="score SlideBench outputs (accuracy / caption metrics)",
                              description=__doc__)
    sub = p.add_subparsers(dest="eval_task", metavar="TASK")
    sub.required = True

    m = sub.add_parser("mcq", help="multiple-choice accuracy (overall, per category, per tumor/task)")
    m.add_argument("pred_csv", type=Path, help="output CSV with Answer and Output (and Pred if present)")
    m.add_argument("--reparse", action="store_true", help="ignore the Pred column and parse Output again")
    m.add_argument("--group-by", nargs="*", default=None, metavar="COLUMN",
                   help="group columns (default: those of Broad Category, Narrow Category, Tumor, Task "
                        "present)")
    _outputs(m)
    m.set_defaults(func=run_mcq)

    c = sub.add_parser("caption", help="BLEU-1..4, ROUGE-L and METEOR against reference captions")
    c.add_argument("pred_csv", type=Path, help="output CSV with a prediction and a reference column")
    c.add_argument("--ref-column", default=None,
                   help="reference text column (default: first of Caption, Report, Answer, Reference, "
                        "Text)")
    c.add_argument("--pred-column", default="Output", help="prediction column (default: Output)")
    c.add_argument("--per-row-csv", type=Path, default=None,
                   help="also write the input rows with one column per metric")
    _outputs(c)
    c.set_defaults(func=run_caption)


def _outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-json", type=Path, default=None, help="write the full report as JSON")
    p.add_argument("--out-md", type=Path, default=None, help="write the Markdown report")


def run_mcq(args: argparse.Namespace) -> int:
    from slidechat.evaluation.mcq import score_mcq
    from slidechat.evaluation.slidebench import read_csv_text
    from slidechat.evaluation.tables import write_reports

    df = read_csv_text(args.pred_csv)
    report = score_mcq(df, group_columns=args.group_by, source=str(args.pred_csv),
                       use_pred=not args.reparse)
    md = report.to_markdown()
    write_reports(report.to_dict(), md, args.out_json, args.out_md)
    print(md, end="")
    return 0


def run_caption(args: argparse.Namespace) -> int:
    from slidechat.evaluation.captions import caption_metrics
    from slidechat.evaluation.slidebench import CAPTION_REF_COLUMNS, read_csv_text
    from slidechat.evaluation.tables import caption_markdown, write_reports
    from slidechat.utils.atomic import atomic_path
    from slidechat.utils.errors import SlideChatError

    df = read_csv_text(args.pred_csv)
    cols = list(df.columns)
    ref = args.ref_column or next((c for c in CAPTION_REF_COLUMNS if c in cols and c != args.pred_column),
                                  None)
    missing = [c for c in (args.pred_column, ref) if c is None or c not in cols]
    if missing or ref is None:
        raise SlideChatError(
            f"missing column(s) {[c for c in missing if c] or ['<reference>']}", args.pred_csv,
            hint=f"columns found: {cols}; choose them with --pred-column/--ref-column")
    if "Error" in cols:
        failed = int((df["Error"].str.strip() != "").sum())
        if failed:
            logger.warning("%d row(s) have an Error (no output); they are scored as empty predictions",
                           failed)
    report = caption_metrics(df[args.pred_column].tolist(), df[ref].tolist(), per_row=True)
    report.update(source=str(args.pred_csv), pred_column=args.pred_column, ref_column=ref)
    md = caption_markdown(report, str(args.pred_csv))
    write_reports(report, md, args.out_json, args.out_md)
    if args.per_row_csv:
        rows = df.copy()
        for name in report["corpus"]:
            rows[name] = [f"{r[name]:.6f}" for r in report["rows"]]
        with atomic_path(args.per_row_csv) as tmp:
            rows.to_csv(tmp, index=False, lineterminator="\n")
    print(md, end="")
    return 0

"""``slidechat test CONFIG --checkpoint CKPT --test_slide_csv A.csv --test_output_csv B.csv``: [slides] SlideBench.

The same path as ``xtuner test CONFIG --checkpoint CKPT --cfg-options test_slide_csv=A.csv ...``: the
mmengine Runner is built from the config with these flags as top-level overrides, the checkpoint is
loaded through the model's ``load_state_dict`` and ``runner.test()`` runs the SlideBench test loop,
so both give the same output CSV. An interrupted run resumes where it stopped (``--overwrite``
starts afresh). The accuracy table is printed and written to ``<output>.report.json/.md``.
The question CSV, the feature folder and the output path are checked before the model is built.
Cytology models are answered with ``slidechat infer`` and scored with ``slidechat eval``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from slidechat.cli.args import add_trust_remote_code_argument
from slidechat.engine.overrides import parse_cfg_options

logger = logging.getLogger(__name__)


def register(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser("test", help="[slides] answer a SlideBench CSV with a trained model and score it",
                              description=__doc__.splitlines()[0])
    p.add_argument("config", help="training config with the SlideBench test section "
                                  "(configs/slidechat/stage_2.py, ...)")
    p.add_argument("--checkpoint", required=True,
                   help="iter_N.pth / epoch_N.pth, a DeepSpeed checkpoint folder, a work dir (its last "
                        "checkpoint), an exported model folder, or a released-style state dict")
    p.add_argument("--test_slide_csv", "--test-slide-csv", required=True, help="SlideBench question CSV")
    p.add_argument("--test_output_csv", "--test-output-csv", required=True, help="answers CSV to write")
    p.add_argument("--feature_root", "--feature-root", default=None,
                   help="folder of feature files (default: the config's feature_root)")
    p.add_argument("--feature_template", "--feature-template", default=None,
                   help="feature path template, e.g. '{feature_root}/{Tumor}/{Slide}' (default: that "
                        "when the CSV has a Tumor column, else '{feature_root}/{Slide}')")
    p.add_argument("--batch_size", "--batch-size", type=int, default=None,
                   help="rows per generation batch (default: the config's test_batch_size, 8)")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=None,
                   help="generation limit (default: the config's max_new_tokens, 500)")
    p.add_argument("--overwrite", action="store_true", help="start the output afresh instead of resuming")
    p.add_argument("--task", choices=["mcq", "caption"], default=None,
                   help="force the task (default: from the CSV's columns: option columns A, B -> mcq; a "
                        "Caption/Report/Reference/Text column -> caption; otherwise an error)")
    p.add_argument("--max-prompt-tokens", "--max_prompt_tokens", type=int, default=None,
                   help="cap on a prompt's text tokens; longer rows get an Error entry (default: the "
                        "config's max_prompt_tokens, else the LLM's context length - max_new_tokens)")
    p.add_argument("--no-prefix-reuse", "--no_prefix_reuse", dest="prefix_reuse", action="store_false",
                   default=None,
                   help="answer every row with its own full prefill (today's path, for A/B runs); by default "
                        "the questions of one slide share one slide encoding and one prefill of their common "
                        "prompt prefix (same greedy answers, much faster)")
    p.add_argument("--compat", default=None, choices=["slidechat_v1"],
                   help="released-SlideChat encoder behaviour (for the released weights)")
    p.add_argument("--work-dir", "--work_dir", default=None,
                   help="mmengine log folder (default: ./work_dirs/<config name>, as xtuner test)")
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--cfg-options", nargs="+", default=None, metavar="KEY=VALUE",
                   help="other config overrides, as for xtuner")
    p.add_argument("--allow-partial", "--allow_partial", action="store_true",
                   help="accept a checkpoint that lacks some trained weights (they stay as initialised) or "
                        "holds unexpected ones, with a warning; by default that is an error")
    add_trust_remote_code_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    # lazy: the application imports torch, mmengine and xtuner; `slidechat --help` must not wait for them
    from slidechat.apps.test import TestOptions, run_test
    from slidechat.model.checkpoint import resolve_checkpoint  # lazy: torch, as above

    options = TestOptions(
        config=Path(args.config), checkpoint=resolve_checkpoint(args.checkpoint),
        test_slide_csv=Path(args.test_slide_csv), test_output_csv=Path(args.test_output_csv),
        feature_root=None if args.feature_root is None else Path(args.feature_root),
        feature_template=args.feature_template, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, overwrite=args.overwrite, task=args.task,
        max_prompt_tokens=args.max_prompt_tokens, compat=args.compat, prefix_reuse=args.prefix_reuse,
        cfg_options=parse_cfg_options(args.cfg_options) or {},
        work_dir=None if args.work_dir is None else Path(args.work_dir), launcher=args.launcher,
        allow_partial=args.allow_partial, trust_remote_code=args.trust_remote_code)
    report = run_test(options)
    print(report.to_markdown(), end="")
    return 0

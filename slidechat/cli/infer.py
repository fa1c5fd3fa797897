"""``slidechat infer``: [cytology] batch predictions for a LLaMA-Factory dataset with a Qwen2-VL model (CytoChat).

Same flags and defaults as LLaMA-Factory's ``scripts/vllm_infer.py``; the output JSONL has its
``prompt``/``predict``/``label`` plus ``id`` (dataset, row index, id column) and ``images`` so rows
join back, and ``error`` on rows that failed (unreadable image, an image placeholder cut off by
``--cutoff_len``). Prompt and label are cut to ``--cutoff_len`` as vllm_infer cuts them.
Lines are appended and fsynced per batch: rerunning the same command after a crash or kill -9
continues where it stopped (``--overwrite`` starts afresh). Greedy when ``--temperature 0``.

This module is the argparse front end; the application is :mod:`slidechat.apps.infer`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Optional

from slidechat.cli.args import add_trust_remote_code_argument
from slidechat.cli.main import main as cli_main

logger = logging.getLogger(__name__)

ENGINES = ("transformers", "vllm")
DTYPES = ("auto", "bf16", "fp16", "fp32")


def _bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def register(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser(
        "infer", help="[cytology] batch predictions (JSONL) for a LLaMA-Factory dataset with a Qwen2-VL "
                      "model",
        description=__doc__.splitlines()[0])
    _model_arguments(p.add_argument_group("model"))
    _data_arguments(p.add_argument_group("data"))
    _generation_arguments(p.add_argument_group("generation"))
    o = p.add_argument_group("output")
    o.add_argument("--save_name", default="generated_predictions.jsonl", help="output JSONL")
    o.add_argument("--overwrite", action="store_true", help="start the output afresh instead of resuming")
    o.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _model_arguments(m: argparse._ArgumentGroup) -> None:
    m.add_argument("--model_name_or_path", required=True,
                   help="local Hugging Face folder: Qwen2-VL-Instruct, CytoChat weights, an exported folder")
    m.add_argument("--adapter_name_or_path", default=None, help="LoRA adapter folder (merged on load)")
    m.add_argument("--template", default=None,
                   help="prompt template: qwen2_vl or qwen3_vl (default: the model folder's family's LLaMA-Factory "
                        "template, qwen2_vl for Qwen2-VL / Qwen2.5-VL, qwen3_vl for Qwen3-VL)")
    m.add_argument("--engine", choices=ENGINES, default="transformers",
                   help="transformers (default; CPU or GPU) or vllm (only if vLLM is installed)")
    m.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    m.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    add_trust_remote_code_argument(m)
    m.add_argument("--allow-partial", "--allow_partial", action="store_true",
                   help="accept a model folder whose weights files lack some of the model's weights (they "
                        "stay random) or hold unexpected ones, with a warning; by default that is an error")


def _data_arguments(d: argparse._ArgumentGroup) -> None:
    d.add_argument("--dataset", default="alpaca_en_demo",
                   help="dataset name(s) in <dataset_dir>/dataset_info.json (comma-separated), or a "
                        "JSON/JSONL file")
    d.add_argument("--dataset_dir", default="data", help="folder holding dataset_info.json (default data)")
    d.add_argument("--max_samples", type=int, default=None, help="first N rows of each dataset")
    d.add_argument("--skip_bad", action="store_true",
                   help="follow LLaMA-Factory's row rules instead of stopping: drop the rows it drops (a "
                        "conversation ending with a user turn, roles out of order, a system message without "
                        "system_tag), keep empty answers, skip unreadable rows; the counts go in one log line")
    d.add_argument("--cutoff_len", type=int, default=2048,
                   help="prompt+label token budget (images counted once): both are cut to it by "
                        "LLaMA-Factory's infer_seqlen rule, as vllm_infer does (default 2048)")
    d.add_argument("--default_system", default=None,
                   help="system prompt for rows without one (default: the template's)")
    d.add_argument("--image_max_pixels", type=int, default=768 * 768)
    d.add_argument("--image_min_pixels", type=int, default=32 * 32)


def _generation_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--max_new_tokens", type=int, default=1024)
    g.add_argument("--temperature", type=float, default=0.95, help="0 = greedy (default 0.95)")
    g.add_argument("--top_p", type=float, default=0.7)
    g.add_argument("--top_k", type=int, default=50)
    g.add_argument("--repetition_penalty", type=float, default=1.0)
    g.add_argument("--skip_special_tokens", type=_bool, nargs="?", const=True, default=True,
                   help="decode prompt/label/predict without special tokens (default true)")
    g.add_argument("--batch_size", type=int, default=None,
                   help="rows per generate call (default: 1024 with vllm as vllm_infer, 8 with "
                        "transformers, whose padded batches grow with the longest row)")
    g.add_argument("--no-prefix-reuse", "--no_prefix_reuse", dest="prefix_reuse", action="store_false",
                   help="transformers engine: answer every row with its own full prefill (today's path, for "
                        "A/B runs); by default the questions of one image share one vision-tower run and one "
                        "prefill of their common prompt prefix (same greedy answers)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (per batch, so resumes reproduce)")
    g.add_argument("--vllm_config", default="{}", help="JSON dict of extra vLLM engine arguments")
    g.add_argument("--pipeline_parallel_size", type=int, default=1,
                   help="vLLM pipeline-parallel GPUs (default 1, as vllm_infer); > 1 only with --engine vllm")
    g.add_argument("--enable_thinking", type=_bool, nargs="?", const=True, default=True,
                   help="as in vllm_infer (default true); only reasoning templates (qwen3_vl) use it, so it "
                        "has no effect with qwen2_vl, as in LLaMA-Factory")
    g.add_argument("--video_fps", type=float, default=2.0,
                   help="accepted as in vllm_infer (default 2.0); used only by video rows, which are refused")
    g.add_argument("--video_maxlen", type=int, default=128,
                   help="accepted as in vllm_infer (default 128); used only by video rows, which are refused")


def run(args: argparse.Namespace) -> int:
    # lazy: start-up - the application imports torch and transformers; `slidechat --help` must not wait
    from slidechat.apps import infer as app

    names = {f.name for f in dataclasses.fields(app.InferSettings)} - {"progress"}
    settings = app.InferSettings(**{k: getattr(args, k) for k in names}, progress=not args.no_progress)
    stats = app.run_infer(settings)
    if stats is None:  # the output held every prediction already
        return 0
    logger.info("%s: %s", args.save_name, stats.summary())
    if stats.errors:
        logger.warning("%d row(s) failed; see their \"error\" field in %s", stats.errors, args.save_name)
    return 0


def main(argv: Optional[list] = None) -> int:  # pragma: no cover - convenience
    return cli_main(["infer", *(argv or [])])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""``slidechat infer``: [cytology] batch predictions for a LLaMA-Factory dataset with a Qwen2-VL model (CytoChat).

Same flags and defaults as LLaMA-Factory's ``scripts/vllm_infer.py``; the output JSONL has its
``prompt``/``predict``/``label`` plus ``id`` (dataset, row index, id column) and ``images`` so rows
join back, and ``error`` on rows that failed (unreadable image, an image placeholder cut off by
``--cutoff_len``). Prompt and label are cut to ``--cutoff_len`` as vllm_infer cuts them.
Lines are appended and fsynced per batch: rerunning the same command after a crash or kill -9
continues where it stopped (``--overwrite`` starts afresh). Greedy when ``--temperature 0``.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Optional

from slidechat.cli.args import add_trust_remote_code_argument

logger = logging.getLogger(__name__)

ENGINES = ("transformers", "vllm")
DTYPES = ("auto", "bf16", "fp16", "fp32")
DEFAULT_BATCH = {"vllm": 1024, "transformers": 8}


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
    m = p.add_argument_group("model")
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
    d = p.add_argument_group("data")
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
    g = p.add_argument_group("generation")
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
    o = p.add_argument_group("output")
    o.add_argument("--save_name", default="generated_predictions.jsonl", help="output JSONL")
    o.add_argument("--overwrite", action="store_true", help="start the output afresh instead of resuming")
    o.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    from slidechat.inference.loop import INFER_TEMPLATES, require_vllm
    from slidechat.utils.errors import SlideChatError

    if args.template is not None and args.template not in INFER_TEMPLATES:
        raise SlideChatError(f"unknown template {args.template!r}: slidechat infer supports "
                             f"{', '.join(INFER_TEMPLATES)} (CytoChat / Qwen2-VL)",
                             hint="slide models (SlideChat) are run with `slidechat test`")
    if args.batch_size is None:
        args.batch_size = DEFAULT_BATCH[args.engine]
    for name in ("max_new_tokens", "batch_size", "cutoff_len", "image_max_pixels", "image_min_pixels"):
        if getattr(args, name) < 1:
            raise SlideChatError(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if args.max_samples is not None and args.max_samples < 1:
        raise SlideChatError(f"--max_samples must be >= 1 (got {args.max_samples})")
    if args.temperature < 0 or not (0 < args.top_p <= 1) or args.repetition_penalty <= 0:
        raise SlideChatError("need --temperature >= 0, 0 < --top_p <= 1, --repetition_penalty > 0")
    if args.pipeline_parallel_size < 1:
        raise SlideChatError(f"--pipeline_parallel_size must be >= 1 (got {args.pipeline_parallel_size})")
    if args.pipeline_parallel_size > 1 and args.engine != "vllm":
        raise SlideChatError(f"--pipeline_parallel_size {args.pipeline_parallel_size}: the transformers engine "
                             "runs on one device", hint="use --engine vllm, or leave it at 1")
    if args.video_fps <= 0 or args.video_maxlen < 1:
        raise SlideChatError("need --video_fps > 0 and --video_maxlen >= 1")
    if args.engine == "vllm":
        require_vllm()
        import torch

        if args.pipeline_parallel_size > max(torch.cuda.device_count(), 1):
            # vllm_infer's own check: "Pipeline parallel size should be smaller than the number of gpus."
            raise SlideChatError(f"--pipeline_parallel_size {args.pipeline_parallel_size} is more than the "
                                 f"{torch.cuda.device_count()} GPU(s) here")


def resolve_template(args: argparse.Namespace) -> None:
    """``--template`` left out: the model folder's family decides (its config's ``model_type``); resolved
    before the run settings are recorded, so a resume compares the template actually used."""
    if args.template is None:
        from slidechat.model.qwen2vl import read_family
        from slidechat.utils.errors import SlideChatError

        try:
            args.template = read_family(args.model_name_or_path)[1].lf_template
        except SlideChatError:  # the model load says what is wrong with the folder, in its own order
            pass


#: flags that change the predictions (a resume with other values is refused)
SETTINGS_KEYS = ("model_name_or_path", "adapter_name_or_path", "template", "engine", "cutoff_len",
                 "default_system", "image_max_pixels", "image_min_pixels", "max_new_tokens", "temperature",
                 "top_p", "top_k", "repetition_penalty", "skip_special_tokens", "seed", "vllm_config")


def run_settings(args: argparse.Namespace) -> dict:
    """What produced the predictions (model folders as absolute paths); batch size and device excluded."""
    out = {k: getattr(args, k) for k in SETTINGS_KEYS}
    for k in ("model_name_or_path", "adapter_name_or_path"):
        if out[k] is not None:
            out[k] = os.path.abspath(out[k])
    if out["temperature"] == 0:  # greedy: the sampling knobs do not matter
        for k in ("top_p", "top_k", "seed"):
            out[k] = None
    return out


def _check_images_exist(items: Any, dataset_dir: str) -> None:
    """A missing image is one row's ``error``; none of them there (a wrong --dataset_dir, images not
    copied) is one line now, before the model loads, not an output of error rows after it."""
    from slidechat.utils.errors import SlideChatError

    paths = [p for it in items for p in it.images]
    missing = [p for p in paths if not os.path.isfile(p)]
    if paths and len(missing) == len(paths):
        raise SlideChatError(f"none of the dataset's {len(paths)} image files exists (first: {missing[0]})",
                             dataset_dir, hint="check --dataset_dir and the rows' image paths")
    if missing:
        logger.warning("%d of %d image files are missing (first: %s); their rows will get an error",
                       len(missing), len(paths), missing[0])


def run(args: argparse.Namespace) -> int:
    import json

    from slidechat.inference.loop import (Qwen2VLFamily, SamplingSettings, VllmQwen2VLFamily,
                                          cytology_items, run_inference)
    from slidechat.inference.writers import JsonlPredictionWriter, check_run_settings
    from slidechat.utils.devices import resolve_device_dtype
    from slidechat.data.llamafactory import read_llamafactory
    from slidechat.utils.errors import SlideChatError
    from slidechat.utils.outputs import require_file_path

    check_args(args)
    require_file_path(args.save_name, "--save_name")  # the output rule, before the dataset or model
    examples = read_llamafactory(args.dataset, args.dataset_dir, check_images=False,
                                 max_samples=args.max_samples, skip_bad=args.skip_bad, lf_rules=args.skip_bad,
                                 predict=True)
    if not examples:
        raise SlideChatError(f"dataset {args.dataset!r} has no rows", args.dataset_dir)
    items = cytology_items(examples, args.default_system)
    _check_images_exist(items, args.dataset_dir)  # before the model loads
    resolve_template(args)
    writer = JsonlPredictionWriter(args.save_name, [(it.key, it.images) for it in items],
                                   overwrite=args.overwrite)
    try:
        check_run_settings(args.save_name, run_settings(args), fresh=writer.done == 0)
        if writer.complete:
            logger.info("%s already holds all %d predictions (use --overwrite to redo them)",
                        args.save_name, len(items))
            return 0
        sampling = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_p=args.top_p, top_k=args.top_k,
                                    repetition_penalty=args.repetition_penalty, seed=args.seed)
        text_kw = dict(cutoff_len=args.cutoff_len, skip_special_tokens=args.skip_special_tokens,
                       default_system=args.default_system, image_max_pixels=args.image_max_pixels,
                       image_min_pixels=args.image_min_pixels, template=args.template,
                       enable_thinking=args.enable_thinking)
        if args.engine == "vllm":
            try:
                vcfg = json.loads(args.vllm_config)
            except json.JSONDecodeError as e:
                raise SlideChatError(f"--vllm_config is not JSON: {e}") from e
            family: Any = VllmQwen2VLFamily(args.model_name_or_path, sampling,
                                            adapter_name_or_path=args.adapter_name_or_path,
                                            vllm_config=vcfg, trust_remote_code=args.trust_remote_code,
                                            pipeline_parallel_size=args.pipeline_parallel_size, **text_kw)
        else:
            from slidechat.model.qwen2vl import load_qwen2vl

            device, dtype = resolve_device_dtype(args.device, args.dtype)
            if args.seed is not None:
                import transformers

                transformers.set_seed(args.seed)
            model, processor = load_qwen2vl(args.model_name_or_path, args.adapter_name_or_path,
                                            torch_dtype=dtype, device=device,
                                            trust_remote_code=args.trust_remote_code,
                                            allow_partial=args.allow_partial)
            family = Qwen2VLFamily(model, processor, sampling, **text_kw)
        logger.info("%s: %d rows, %d done, %d to run (batch %d, %s engine, %s)", args.save_name,
                    len(items), writer.done, writer.num_pending, args.batch_size, args.engine,
                    "greedy" if sampling.greedy else f"temperature {sampling.temperature}")
        stats = run_inference(items, writer, family, batch_size=args.batch_size,
                              progress=not args.no_progress, desc="slidechat infer")
    finally:
        writer.close()
    logger.info("%s: %s", args.save_name, stats.summary())
    if stats.errors:
        logger.warning("%d row(s) failed; see their \"error\" field in %s", stats.errors, args.save_name)
    return 0


def main(argv: Optional[list] = None) -> int:  # pragma: no cover - convenience
    from slidechat.cli.main import main as cli_main

    return cli_main(["infer", *(argv or [])])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

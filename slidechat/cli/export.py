"""``slidechat export CONFIG --checkpoint CKPT --out DIR``: checkpoint -> model folder (slides: SlideChat; cytology: Qwen2-VL).

The folder (``SlideChatModel.save_pretrained``: LLM + tokenizer, slide modules, config) loads with
``SlideChatModel.from_pretrained`` without xtuner, the config or the original LLM folder. LoRA
adapters are merged into the LLM weights. Qwen2-VL (cytology) configs export a plain Hugging Face folder
instead (``save_pretrained`` of the model and its processor, LoRA merged) that ``transformers`` and vLLM
load as they are.

Either way the folder is written whole beside ``--out`` and swapped in when complete (an earlier export
there is replaced atomically; a crash leaves it as it was). A non-empty ``--out`` that is not an export
of ours is refused unless ``--overwrite``, which writes the export there and keeps the other files.
"""

from __future__ import annotations

import argparse
import logging

from slidechat.cli.args import add_trust_remote_code_argument
from slidechat.engine.overrides import parse_cfg_options
from slidechat.utils.outputs import check_output_folder

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="[slides, cytology] export a trained checkpoint as a model folder",
                              description=__doc__.splitlines()[0])
    p.add_argument("config", help="the training config (configs/slidechat/stage_2.py, ...)")
    p.add_argument("--checkpoint", default=None,
                   help="iter_N.pth / epoch_N.pth, a DeepSpeed checkpoint folder, a work dir "
                        "(its last checkpoint) or a released-style state dict; omitted: the "
                        "config's model as built (pretrained_pth loaded)")
    p.add_argument("--out", required=True,
                   help="output folder (new, empty, or an earlier export, which is replaced atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder that holds no export of ours (its other files "
                        "are kept; the export's own entries replace same-named ones)")
    p.add_argument("--cfg-options", nargs="+", default=None, metavar="KEY=VALUE",
                   help="config overrides, as for xtuner train")
    p.add_argument("--allow-partial", "--allow_partial", action="store_true",
                   help="accept a checkpoint that lacks some trained weights (they stay as initialised) or "
                        "holds unexpected ones, with a warning; by default that is an error")
    add_trust_remote_code_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: the builders import torch, transformers, mmengine and xtuner; `slidechat --help` must not wait
    from slidechat.engine.builder import build_model_from_config
    # lazy: as above
    from slidechat.engine.qwen2vl_train import QWEN2VL_EXPORT_KIND, config_is_qwen2vl, export_qwen2vl
    from slidechat.model.checkpoint import resolve_checkpoint  # lazy: torch, as above
    from slidechat.model.slidechat_model import EXPORT_KIND, legacy_export_entries  # lazy: torch, as above

    qwen2vl = config_is_qwen2vl(args.config)
    # the output rule first: a bad --out is one line in a second, not after the model is built
    if qwen2vl:
        check_output_folder(args.out, QWEN2VL_EXPORT_KIND, overwrite=args.overwrite)
    else:
        check_output_folder(args.out, EXPORT_KIND, overwrite=args.overwrite, legacy=legacy_export_entries)
    checkpoint = None if args.checkpoint is None else resolve_checkpoint(args.checkpoint)
    if qwen2vl:  # cytology (Qwen2-VL) configs: a plain Hugging Face folder
        out = export_qwen2vl(args.config, checkpoint, args.out,
                             cfg_options=parse_cfg_options(args.cfg_options), allow_partial=args.allow_partial,
                             overwrite=args.overwrite)
        print(out)
        return 0
    core, tokenizer = build_model_from_config(args.config, checkpoint=checkpoint,
                                              cfg_options=parse_cfg_options(args.cfg_options),
                                              allow_partial=args.allow_partial,
                                              trust_remote_code=args.trust_remote_code)
    out = core.save_pretrained(args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    logger.info("exported to %s", out)
    print(out)
    return 0

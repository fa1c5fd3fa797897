"""``slidechat chat``: [slides, cytology] talk about one slide or one cytology field of view in the terminal.

Slides: ``--checkpoint CKPT (--features X.h5 | --slide X.svs)``; images (Qwen2-VL / CytoChat):
``--image field.jpg --model_name_or_path DIR`` -- the same loop, boxes printed as generated.

Reads one question per line from stdin and prints each answer; ``exit``/``quit`` or end of input
stops, ``reset`` clears the conversation. The conversation so far is part of every prompt. A raw
slide is patched and encoded on the fly with the feature extraction pipeline (same options as
``slidechat extract``). The checkpoint is an exported folder, or a training checkpoint with --config.

The input (features, slide, image) is read and checked before the model loads, so a wrong path costs
seconds, not the minutes a 7B model takes. stdout carries the answers only (with ``--jsonl``: JSON
lines only); every log line, the framework's included, goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Any, Tuple

from slidechat.cli.args import add_trust_remote_code_argument
from slidechat.data.limits import DEFAULT_MAX_INPUT_CHARS, InputRefused, read_input_line
from slidechat.engine.overrides import parse_cfg_options
from slidechat.utils.errors import SlideChatError
from slidechat.utils.logging import route_mmengine_logs_to_stderr

logger = logging.getLogger(__name__)

EXIT_WORDS = ("exit", "quit", ":q")


def register(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser("chat", help="[slides, cytology] multi-turn chat about one slide or one field of view",
                              description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None,
                   help="slides: exported model folder, or a training checkpoint (with --config)")
    p.add_argument("--model_name_or_path", "--model-name-or-path", default=None,
                   help="images: local Qwen2-VL folder (CytoChat, base Qwen2-VL-Instruct, exported)")
    p.add_argument("--adapter_name_or_path", "--adapter-name-or-path", default=None,
                   help="images: LoRA adapter folder (merged on load)")
    p.add_argument("--config", default=None, help="training config (needed for training checkpoints)")
    p.add_argument("--cfg-options", nargs="+", default=None, metavar="KEY=VALUE",
                   help="config overrides, as for xtuner")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", help="feature file of the slide (.h5 / SlideChat .csv / .pt)")
    src.add_argument("--slide", help="raw slide (.svs, .tiff, ...): features are extracted now")
    src.add_argument("--image", help="one field-of-view image (.jpg/.png/...) for a Qwen2-VL model "
                                     "(--model_name_or_path)")
    ex = p.add_argument_group("extraction (with --slide)")
    ex.add_argument("--encoder", default="conch_v1", help="patch encoder name (default: conch_v1)")
    ex.add_argument("--encoder-checkpoint", default=None, help="patch encoder weights")
    ex.add_argument("--magnification", type=float, default=None,
                    help="target magnification (default 20)")
    ex.add_argument("--mpp", type=float, default=None, help="target microns per pixel (instead of "
                                                              "--magnification)")
    ex.add_argument("--base-mpp", type=float, default=None,
                    help="level-0 MPP for slides whose file does not say")
    ex.add_argument("--patch-size", type=int, default=None, help="patch size in pixels (default 224)")
    ex.add_argument("--tissue-threshold", type=float, default=None,
                    help="minimum tissue fraction of a kept patch (default 0.5)")
    ex.add_argument("--no-tissue-seg", action="store_true", help="use the whole image")
    ex.add_argument("--num-workers", type=int, default=None, help="patch-reading processes")
    ex.add_argument("--device", default="auto",
                    help="device for the patch encoder (slides) or the Qwen2-VL model (--image)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=500)
    g.add_argument("--no-prefix-reuse", dest="prefix_reuse", action="store_false",
                   help="prefill every turn's whole prompt (slide or image) again instead of keeping the LLM cache "
                        "across turns (same greedy answers; for A/B runs)")
    g.add_argument("--max-patches", type=int, default=None,
                   help="patch cap (uniform subsample; default: the model's max_patches_test)")
    g.add_argument("--system", default="", help="system prompt (default: slides empty, as in training; "
                                                 "images the qwen2_vl template's)")
    g.add_argument("--image-max-pixels", "--image_max_pixels", type=int, default=768 * 768)
    g.add_argument("--image-min-pixels", "--image_min_pixels", type=int, default=32 * 32)
    g.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="images: model dtype (auto: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="slides: cap on the text tokens of a turn's prompt (the conversation so far + the "
                        "question); longer turns are refused (default: the LLM's context - max-new-tokens)")
    g.add_argument("--max-input-chars", type=int, default=None,
                   help="longest input line accepted, in characters; longer lines are refused unread "
                        "(default: 16 x the prompt token cap, else 1,000,000)")
    g.add_argument("--jsonl", action="store_true",
                   help="print each turn as one JSON line {turn, question, answer} (for scripts)")
    g.add_argument("--show-prompt", action="store_true",
                   help="print each turn's full prompt (with the history) to stderr")
    p.add_argument("--allow-partial", "--allow_partial", action="store_true",
                   help="accept a checkpoint that lacks some trained weights (they stay as initialised) or "
                        "holds unexpected ones, with a warning; by default that is an error")
    add_trust_remote_code_argument(p)
    p.set_defaults(func=run)


def _extract_options(args: argparse.Namespace) -> dict:
    """The extraction flags given (with ``--slide``), as ``extract_slide_features`` keywords."""
    opts = {"device": args.device, "progress": False}
    if args.magnification is not None:
        opts["target_magnification"] = args.magnification
    if args.mpp is not None:
        opts["target_mpp"], opts["target_magnification"] = args.mpp, None
    if args.base_mpp is not None:
        opts["base_mpp"] = args.base_mpp
    if args.patch_size is not None:
        opts["patch_size"] = args.patch_size
    if args.tissue_threshold is not None:
        opts["tissue_threshold"] = args.tissue_threshold
    if args.no_tissue_seg:
        opts["no_tissue_seg"] = True
    if args.num_workers is not None:
        opts["num_workers"] = args.num_workers
    return opts


def _keep_stdout_for_answers() -> None:
    """DeepSpeed (imported by accelerate/transformers) logs "Setting accelerator to CPU" to stdout
    when it finds no GPU; naming the CPU accelerator keeps a piped chat transcript clean."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _require_paths(args: argparse.Namespace) -> None:
    """The paths the user gave exist, checked before anything heavy runs (one line naming the flag)."""
    for flag, value, want_file in (("--features", args.features, True), ("--slide", args.slide, None),
                                   ("--image", args.image, True), ("--config", args.config, True),
                                   ("--checkpoint", args.checkpoint, None),
                                   ("--model_name_or_path", args.model_name_or_path, None),
                                   ("--adapter_name_or_path", args.adapter_name_or_path, False)):
        if value is None:
            continue
        if not os.path.exists(value):
            raise SlideChatError(f"{flag}: no such file or folder", value)
        if want_file is True and not os.path.isfile(value):
            raise SlideChatError(f"{flag} must be a file, not a folder", value)
        if want_file is False and not os.path.isdir(value):
            raise SlideChatError(f"{flag} must be a folder", value)


def run(args: argparse.Namespace) -> int:
    _require_paths(args)  # before the torch import below: a mistyped path costs nothing
    _keep_stdout_for_answers()
    route_mmengine_logs_to_stderr()
    # loading prints nothing on stdout: a stray print of a library goes to stderr with the logs
    with contextlib.redirect_stdout(sys.stderr):
        session, banner = _session(args)
    return chat_loop(session, args, banner)


def _session(args: argparse.Namespace) -> Tuple[Any, str]:
    """The chat session and its banner; the input is read (and checked) before the model loads."""
    # lazy: start-up - the app imports torch, transformers and mmengine; `slidechat --help` stays instant
    from slidechat.apps import chat as app

    if args.image:
        session = app.open_image_session(
            args.image, args.model_name_or_path or args.checkpoint, args.adapter_name_or_path,
            device=args.device, dtype=args.dtype,
            trust_remote_code=args.trust_remote_code, allow_partial=args.allow_partial,
            max_new_tokens=args.max_new_tokens, system=args.system or None,
            image_max_pixels=args.image_max_pixels, image_min_pixels=args.image_min_pixels,
            prefix_reuse=args.prefix_reuse)
        width, height = session.image.size
        return session, f"Image loaded ({width}x{height})."
    if not (args.checkpoint or args.model_name_or_path):
        raise SlideChatError("--features/--slide need --checkpoint (an exported folder or a training "
                             "checkpoint with --config)")
    # the input first: a bad feature file or slide fails in seconds
    feats, coords = app.read_slide_features(args.features, args.slide, encoder=args.encoder,
                                            encoder_checkpoint=args.encoder_checkpoint, **_extract_options(args))
    model, tok = app.load_chat_model(args.checkpoint or args.model_name_or_path, args.config,
                                     parse_cfg_options(args.cfg_options),
                                     allow_partial=args.allow_partial, trust_remote_code=args.trust_remote_code)
    dim = model.config.feature_dim
    if feats.shape[1] != dim:  # never cut: other columns are other features
        raise SlideChatError(f"features are {feats.shape[1]} wide, the model expects {dim} (feature_dim)",
                             args.features or args.slide)
    session = app.ChatSession(model, tok, feats, coords, max_new_tokens=args.max_new_tokens,
                              max_patches=args.max_patches, system=args.system,
                              max_prompt_tokens=args.max_prompt_tokens, prefix_reuse=args.prefix_reuse)
    return session, f"Slide loaded ({len(session.features)} patches)."


def chat_loop(session: Any, args: argparse.Namespace, banner: str) -> int:
    """The terminal loop for any session with ``ask``/``reset``/``prompt_text``/``history`` (slides:
    ``ChatSession``, images: ``ImageChatSession``)."""
    interactive = sys.stdin.isatty()
    limit = getattr(session, "prompt_limit", None)
    max_chars = (getattr(args, "max_input_chars", None) or getattr(limit, "max_chars", None)
                 or DEFAULT_MAX_INPUT_CHARS)
    if max_chars < 1:
        raise SlideChatError(f"--max-input-chars must be >= 1, got {max_chars}")
    if interactive:
        print(f"{banner} Ask a question; 'exit' to quit.", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = read_input_line(sys.stdin, max_chars)  # bytes, tolerantly: one bad line is one turn
        if line is None:
            break
        if line.too_long:
            _refused(args, f"input refused: over {max_chars:,} characters ({line.n_bytes:,} bytes; "
                           "--max-input-chars); the conversation continues")
            continue
        if line.invalid_utf8:
            print("warning: input was not valid UTF-8; invalid bytes were replaced by \ufffd",
                  file=sys.stderr, flush=True)
        q = line.text.strip()
        if not q:
            continue
        if q.lower() in EXIT_WORDS:
            break
        if q.lower() == "reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if args.show_prompt:
            print(f"--- prompt (turn {len(session.history) + 1}) ---\n{session.prompt_text(q)}\n---",
                  file=sys.stderr, flush=True)
        try:
            answer = session.ask(q)
        except InputRefused as e:
            _refused(args, f"input refused: {e.reason}; the conversation continues")
            continue
        if args.jsonl:
            print(json.dumps({"turn": len(session.history), "question": q, "answer": answer},
                             ensure_ascii=False), flush=True)
        else:
            print(answer if not interactive else f"slidechat> {answer}", flush=True)
    return 0


def _refused(args: argparse.Namespace, message: str) -> None:
    """A refused turn: the reason on stderr, and in --jsonl mode an ``{"error": ...}`` line on stdout so
    scripts reading one line per question stay aligned."""
    print(message, file=sys.stderr, flush=True)
    if getattr(args, "jsonl", False):
        print(json.dumps({"turn": None, "error": message}, ensure_ascii=False), flush=True)

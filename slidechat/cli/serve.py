"""``slidechat serve``: [slides, cytology] a local web app to view slides and chat about them.

Opens on a folder of slides (with the per-slide H5 files extract-features wrote, and optionally a
``slidechat screen`` output folder) and one model: slides ``--config CFG --checkpoint CKPT`` or an
exported folder (``--checkpoint DIR``); cytology ``--model_name_or_path DIR`` (Qwen2-VL family). The
browser shows deep-zoom tiles, tissue / patch-grid / screening layers, and a chat whose answers carry
their evidence. Binds 127.0.0.1 by default; any other address requires a token (one is generated and
printed when none is given). Inputs are checked before the model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
from pathlib import Path

from slidechat.cli.args import add_trust_remote_code_argument
from slidechat.utils.errors import SlideChatError

logger = logging.getLogger(__name__)


def register(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser("serve", help="[slides, cytology] web app: deep-zoom viewer + chat with evidence",
                              description=__doc__.splitlines()[0])
    p.add_argument("--slides", required=True, help="folder of slides (searched recursively; plain PNG/JPEG "
                                                   "images are single fields of view)")
    p.add_argument("--features", default=None,
                   help="folder of per-slide H5 feature files (extract-features' h5_files/ or its output folder)")
    p.add_argument("--screening", default=None, help="`slidechat screen` output folder (per-field scores layer)")
    m = p.add_argument_group("model (slides: --config + --checkpoint, or an exported --checkpoint folder; "
                             "cytology: --model_name_or_path)")
    m.add_argument("--config", default=None, help="training config (with a training --checkpoint)")
    m.add_argument("--checkpoint", default=None, help="slides: exported model folder or training checkpoint")
    m.add_argument("--cfg-options", nargs="+", default=None, metavar="KEY=VALUE",
                   help="config overrides, as for xtuner")
    m.add_argument("--model_name_or_path", "--model-name-or-path", default=None,
                   help="cytology: local Qwen2-VL-family folder")
    m.add_argument("--adapter_name_or_path", "--adapter-name-or-path", default=None,
                   help="cytology: LoRA adapter folder (merged on load)")
    m.add_argument("--device", default="auto", help="model device (auto: GPU when there is one)")
    m.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens (default 256)")
    m.add_argument("--allow-partial", "--allow_partial", action="store_true",
                   help="accept a checkpoint that lacks some trained weights, with a warning (the model line "
                        "says so); by default that is an error")
    add_trust_remote_code_argument(m)
    e = p.add_argument_group("slides without a feature file (extracted when first asked about)")
    e.add_argument("--encoder", default=None,
                   help="patch encoder for on-demand extraction (default: the one --features were made with)")
    e.add_argument("--encoder-checkpoint", default=None, help="its weights (as for extract-features)")
    e.add_argument("--feature-cache", default=None,
                   help="where extracted H5 files are kept (default: work_dirs/serve_features)")
    n = p.add_argument_group("server")
    n.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other address requires a token)")
    n.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    n.add_argument("--token", default=None,
                   help="access token (default: none on loopback, a generated one on other addresses)")
    n.add_argument("--tile-cache-mb", type=int, default=256, help="in-memory tile cache (default 256 MB)")
    p.set_defaults(func=run)


def _check_inputs(args: argparse.Namespace) -> None:
    """Folders and files exist and the model is named, before anything heavy runs (one line each)."""
    for flag, value, want in (("--slides", args.slides, "dir"), ("--features", args.features, "dir"),
                              ("--screening", args.screening, "dir"), ("--config", args.config, "file"),
                              ("--checkpoint", args.checkpoint, None),
                              ("--model_name_or_path", args.model_name_or_path, "dir"),
                              ("--adapter_name_or_path", args.adapter_name_or_path, "dir"),
                              ("--encoder-checkpoint", args.encoder_checkpoint, "file")):
        if value is None:
            continue
        if not os.path.exists(value):
            raise SlideChatError(f"{flag}: no such file or folder", value)
        if want == "dir" and not os.path.isdir(value):
            raise SlideChatError(f"{flag} must be a folder", value)
        if want == "file" and not os.path.isfile(value):
            raise SlideChatError(f"{flag} must be a file, not a folder", value)
    if args.model_name_or_path and (args.checkpoint or args.config):
        raise SlideChatError("give either --model_name_or_path (cytology) or --config/--checkpoint (slides), "
                             "not both")
    if not (args.model_name_or_path or args.checkpoint):
        raise SlideChatError("no model: give --config CFG --checkpoint CKPT (or an exported --checkpoint folder) "
                             "for slides, or --model_name_or_path DIR for cytology")
    if not 0 < args.port < 65536:
        raise SlideChatError(f"--port must be 1..65535, got {args.port}")
    if args.max_new_tokens < 1:
        raise SlideChatError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.feature_cache and os.path.exists(args.feature_cache) and not os.path.isdir(args.feature_cache):
        raise SlideChatError("--feature-cache must be a folder", args.feature_cache)
    if args.tile_cache_mb < 0:
        raise SlideChatError(f"--tile-cache-mb must be >= 0, got {args.tile_cache_mb}")


def _check_port(host: str, port: int) -> None:
    """The address can be bound now (a port in use is one line, not a traceback after the model load)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise SlideChatError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def run(args: argparse.Namespace) -> int:
    _check_inputs(args)
    # lazy: start-up - the app imports fastapi, torch and the model code; `slidechat --help` stays instant
    from slidechat.apps.serve.app import OSD_SETUP_HINT, create_app, find_openseadragon
    from slidechat.apps.serve.catalog import Catalog  # lazy: as above
    from slidechat.apps.serve.config import ServeConfig  # lazy: as above
    from slidechat.apps.serve.security import is_loopback, new_token  # lazy: as above
    from slidechat.apps.serve.sessions import load_engine  # lazy: as above

    if find_openseadragon() is None:
        raise SlideChatError(f"OpenSeadragon not found (set SLIDECHAT_OPENSEADRAGON or {OSD_SETUP_HINT})")
    token = args.token
    if token is None and not is_loopback(args.host):
        token = new_token()
    config = ServeConfig(slides=Path(args.slides), features=Path(args.features) if args.features else None,
                         screening=Path(args.screening) if args.screening else None, host=args.host,
                         port=args.port, token=token, tile_cache_mb=args.tile_cache_mb)
    n_slides = len(Catalog(config).entries())
    if n_slides == 0:
        logger.warning("%s: no slides found (looked for %s)", args.slides, "svs, tif(f), ndpi, mrxs, png, jpg, ...")
    _check_port(args.host, args.port)
    from slidechat.engine.overrides import parse_cfg_options  # lazy: imports mmengine

    with contextlib.redirect_stdout(sys.stderr):  # stray library prints stay off stdout
        engine = load_engine(config=args.config, checkpoint=args.checkpoint,
                             cfg_options=parse_cfg_options(args.cfg_options),
                             model_name_or_path=args.model_name_or_path,
                             adapter_name_or_path=args.adapter_name_or_path, device=args.device,
                             trust_remote_code=args.trust_remote_code, allow_partial=args.allow_partial,
                             max_new_tokens=args.max_new_tokens, encoder=args.encoder,
                             feature_cache=Path(args.feature_cache) if args.feature_cache else None,
                             extract_options={"checkpoint": args.encoder_checkpoint}
                             if args.encoder_checkpoint else None)
    app = create_app(config, engine)
    import uvicorn  # lazy: only when a server runs

    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{args.port}/" + (f"?token={token}" if token else "")
    logger.info("slidechat serve: %d slides from %s; %s", n_slides, args.slides, engine.model_line)
    print(f"open {url}  (Ctrl-C stops the server)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0

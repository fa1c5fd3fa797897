"""Pieces of ``benchmarks/gpu_suite.sh`` that need Python: a random-weight CONCH checkpoint, CONCH
encoder throughput, extraction timings read back from the H5 files, and the final report.

    python benchmarks/gpu_suite_helper.py conch-ckpt OUT.safetensors
    python benchmarks/gpu_suite_helper.py conch-encoder --checkpoint CKPT --device cuda --json OUT.json
    python benchmarks/gpu_suite_helper.py h5-timing H5_DIR --json OUT.json
    python benchmarks/gpu_suite_helper.py report OUT_DIR

The CONCH checkpoint holds random tensors in the reference key layout (``visual.trunk.*``,
``visual.attn_pool_contrast.*``, ``visual.ln_contrast.*``), so ``--encoder conch_v1 --checkpoint`` loads
it through the same strict key check as the real file: the figures it gives are speed only.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence


def write_conch_checkpoint(out: str) -> int:
    """Random ``visual.*`` tensors of CONCH v1's vision tower, in the released file's key names."""
    import torch
    from safetensors.torch import save_file

    from slidechat.features.encoders.conch import ConchVisionTower

    torch.manual_seed(0)
    tower = ConchVisionTower(448)
    sd = {"visual." + k: v.detach().contiguous() for k, v in tower.state_dict().items()}
    save_file(sd, out)
    print(f"{out}: {len(sd)} random tensors in CONCH v1's vision key layout (speed tests only)")
    return 0


def conch_encoder_speed(checkpoint: str, device: str, batch: int, iters: int, out: Optional[str]) -> int:
    """Patches/s of the conch_v1 encoder alone (its own resize 224 -> 448 and normalisation included) on
    random uint8 224 px patches, as the pipeline hands them over on CUDA; bf16 autocast (what extraction
    uses on CUDA) against fp32 (``--no-amp``): the GPU's share of extraction, without the data path."""
    import torch

    from slidechat.features.encoders import build_encoder

    dev = torch.device(device)
    enc = build_encoder("conch_v1", checkpoint=checkpoint).to(dev).eval()
    x = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device=dev)
    res: Dict[str, Any] = {"batch": batch, "iters": iters, "device": _device_name(device)}
    for name, amp in (("bf16", True), ("fp32", False)):
        with torch.inference_mode(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16,
                                                     enabled=amp):
            enc(x)  # first-call costs
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(iters):
                enc(x)
            _sync(dev)
        res[f"{name}_patches_per_s"] = batch * iters / (time.perf_counter() - t0)
    return _emit(res, out)


def _emit(res: Dict[str, Any], out: Optional[str]) -> int:
    """Print one step's figures as a JSON line (the suite's log) and, with ``out``, save them."""
    print(json.dumps(res))
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def _sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def h5_timing(h5_dir: str, out: Optional[str]) -> int:
    """Sum the ``timing_*`` attributes extraction writes into each H5 (patches, seconds, patches/s)."""
    import h5py

    files = sorted(glob.glob(os.path.join(h5_dir, "**", "*.h5"), recursive=True))
    if not files:
        raise SystemExit(f"no .h5 files under {h5_dir}")
    patches, total, encode = 0, 0.0, 0.0
    for p in files:
        with h5py.File(p, "r") as f:
            patches += int(f["features"].shape[0]) if "features" in f else int(f["coords"].shape[0])
            total += float(f.attrs.get("timing_total_s", 0.0))
            encode += float(f.attrs.get("timing_encode_s", 0.0))
    res = {"slides": len(files), "patches": patches, "total_s": total, "encode_s": encode,
           "patches_per_s": patches / max(total, 1e-9)}
    return _emit(res, out)


# ---------------------------------------------------------------------------------------------- report


def _rate(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.2f}"


def _read(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _status(out_dir: str, step: str) -> str:
    s = _read(os.path.join(out_dir, "status.json")) or {}
    return str(s.get(step, "not run"))


def report(out_dir: str) -> int:
    """gpu_suite.md + gpu_suite.json from the steps' JSON files; a failed or skipped step says so."""
    status = _read(os.path.join(out_dir, "status.json")) or {}
    meta = _read(os.path.join(out_dir, "meta.json")) or {}
    enc = _read(os.path.join(out_dir, "conch_encoder.json"))
    e2e = {k: _read(os.path.join(out_dir, f"extract_{k}.json")) for k in ("bf16", "fp32")}
    step = _read(os.path.join(out_dir, "stage2_step.json"))
    infer = _read(os.path.join(out_dir, "infer.json"))
    lines: List[str] = [f"# GPU suite ({'DRY RUN, tiny sizes, CPU' if meta.get('dry_run') else 'full'})", "",
                        f"machine: {meta.get('device', '?')}; started {meta.get('started', '?')}, "
                        f"{meta.get('seconds', '?')} s in all; git {meta.get('git', '?')}", ""]
    lines += ["## 1. conch_v1 extraction (random weights in CONCH's key layout: speed only)", ""]
    if meta.get("dry_run"):
        lines += ["(dry run on a CPU: extraction autocasts only on CUDA, so 'bf16' and 'fp32' both ran fp32 "
                  "here; the figures only show that the steps work)", ""]
    if enc:
        lines += [f"encoder alone, batch {enc['batch']} x 224 px patches (resized to 448 by the encoder), {enc['iters']} batches: "
                  f"**{_rate(enc['bf16_patches_per_s'])} patches/s bf16** vs {_rate(enc['fp32_patches_per_s'])} fp32 "
                  f"(x{enc['bf16_patches_per_s'] / enc['fp32_patches_per_s']:.2f})", ""]
    for k, label in (("bf16", "bf16 autocast (default)"), ("fp32", "fp32 (`--no-amp`, baseline)")):
        r = e2e[k]
        if r:
            lines.append(f"- `slidechat extract-features` end to end, {label}: {r['patches']} patches on "
                         f"{r['slides']} synthetic slide(s) in {r['total_s']:.1f} s = **{_rate(r['patches_per_s'])} "
                         f"patches/s** (encoder {r['encode_s']:.1f} s)")
    lines += [f"- status: conch encoder {_status(out_dir, 'conch_encoder')}, extraction bf16 "
              f"{_status(out_dir, 'extract_bf16')}, fp32 {_status(out_dir, 'extract_fp32')}", ""]
    lines += ["## 2. Stage-2 step, 7B-shaped LLM, LoRA (configs/slidechat/stage_2_lora.py)", ""]
    if step:
        a = step.get("args", {})
        lines += [f"{a.get('llm')} shape, layers {step['steps'][0]['layers']}, {a.get('dtype')}, "
                  f"{a.get('warmup')} warm-up step(s), activation checkpointing on", "",
                  f"| patches | LM head | s/step | peak {'RSS' if a.get('device') == 'cpu' else 'GPU memory'} (GiB) | "
                  "above model (GiB) | loss |",
                  "|---:|---|---:|---:|---:|---:|"]
        for r in step["steps"]:
            head = "all positions (stock, before)" if r["path"] == "stock" else "labelled positions (training)"
            lines.append(f"| {r['patches']:,} | {head} | {r['seconds']:.2f} | {r['peak_gib']:.2f} | "
                         f"{r['above_gib']:.2f} | {r['loss']:.4f} |")
        lines.append("")
    lines += [f"- status: {_status(out_dir, 'stage2_step')}", ""]
    lines += ["## 3. `slidechat infer`, Qwen2.5-VL-7B-shaped (random weights), examples/s", ""]
    if infer and infer.get("table"):
        lines += [infer["table"], ""]
    lines += [f"- status: model folder {_status(out_dir, 'qwen25vl_folder')}, infer {_status(out_dir, 'infer')}",
              ""]
    lines += ["Logs of every step: `*.log` beside this file."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "gpu_suite.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "gpu_suite.json"), "w") as f:
        json.dump({"meta": meta, "status": status, "conch_encoder": enc, "extract": e2e, "stage2_step": step,
                   "infer": infer}, f, indent=1)
    print(text)
    return 0


def infer_table(log: str, out: str) -> int:
    """Keep the Markdown table ``benchmarks/infer_throughput.py`` printed (its log) as JSON."""
    with open(log) as f:
        text = f.read()
    keep = [ln for ln in text.splitlines() if ln.startswith(("|", "slidechat infer", "peak GPU", "greedy"))]
    with open(out, "w") as f:
        json.dump({"table": "\n".join(keep)}, f, indent=1)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("conch-ckpt")
    p.add_argument("out")
    p = sub.add_parser("conch-encoder")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json")
    p = sub.add_parser("h5-timing")
    p.add_argument("h5_dir")
    p.add_argument("--json")
    p = sub.add_parser("infer-table")
    p.add_argument("log")
    p.add_argument("out")
    p = sub.add_parser("report")
    p.add_argument("out_dir")
    a = ap.parse_args(argv)
    if a.cmd == "conch-ckpt":
        return write_conch_checkpoint(a.out)
    if a.cmd == "conch-encoder":
        return conch_encoder_speed(a.checkpoint, a.device, a.batch, a.iters, a.json)
    if a.cmd == "h5-timing":
        return h5_timing(a.h5_dir, a.json)
    if a.cmd == "infer-table":
        return infer_table(a.log, a.out)
    return report(a.out_dir)


if __name__ == "__main__":
    sys.exit(main())

"""Real-size stage-2 training step (issue 18): seconds and peak memory at 1k / 5k / 10k patches, the
label-logits before/after, and DeepSpeed's ZeRO-2/3 memory estimates for the 7B configs.

    python benchmarks/real_size.py                       # CPU: Qwen2.5-0.5B shape, 4 of its 24 layers, bf16
    python benchmarks/real_size.py --layers 24           # all 24 layers (a CPU: tens of minutes)
    python benchmarks/real_size.py --part zero           # the ZeRO estimates only (no weights allocated)
    python benchmarks/real_size.py --tiny                # tiny LLM, 64 patches: what the test suite runs
    python benchmarks/real_size.py --llm qwen2.5-7b --lora --device cuda --patches 10000   # a GPU

Why it is built this way: the model is the one ``xtuner train configs/slidechat/stage_2*.py`` builds --
``SlideChatTrainModel`` with that config's ``slidechat_config`` (LongNet encoder + projector), LoRA
settings and activation checkpointing, and an LLM loaded by ``CheckedCausalLM.from_pretrained`` (the
config's loader) from a local folder holding the real architecture's ``config.json`` and random weights
written here (no hub). Only ``--layers`` (fewer decoder layers) departs from the real shape, and the
output says so. One training step = ``model(data, mode='loss')`` (the labelled-positions LM head that
training uses) + ``backward()``, under bf16 autocast as ``AmpOptimWrapper(dtype='bfloat16')`` runs it;
the "before" row is the stock full-vocabulary call (``full_logits=True``) on the same model and batch.

Memory: every (size, path) runs in its own child process, so nothing from a previous size lingers in the
allocator. On CPU the child resets the kernel's peak-RSS counter (VmHWM, ``/proc/self/clear_refs`` value
5) after the model and batch are built and reads it after ``backward()``: "peak above model" is that peak
minus the RSS just before the step -- the step's activations, gradients and temporaries, measured by the
kernel (no sampling, no tracemalloc overhead). On CUDA: ``max_memory_allocated`` after
``reset_peak_memory_stats``, minus the allocation before the step, and the absolute peak.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/ (also when imported by path)
from peak_rss import reset_peak_rss, status_kib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: published architectures (the models' config.json); random weights are written from these
LLM_SHAPES: Dict[str, Dict[str, Any]] = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6),
    # --tiny: same model classes, seconds on a CPU (the test suite runs it)
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                 max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6),
}
#: published parameter counts, to cross-check the count from the config (model cards)
PUBLISHED = {"qwen2.5-0.5b": 0.49e9, "qwen2.5-7b": 7.61e9}
#: decoder layers on a CPU unless --layers says otherwise (RESULTS.md, 2 shared cores: the 4-layer
#: 1k/5k/10k run took 3-6 minutes, the 24-layer one 25 minutes)
CPU_DEFAULT_LAYERS = 4
PROMPT_TOKENS, ANSWER_TOKENS = 64, 64  # text around the slide placeholder, then the labelled answer


# ------------------------------------------------------------------------------------------ model


def training_model_cfg(lora: bool) -> Dict[str, Any]:
    """The ``model`` dict of configs/slidechat/stage_2(_lora).py, read with mmengine as xtuner reads it."""
    return copy.deepcopy(_parsed_model_cfg(lora))


@functools.lru_cache(maxsize=2)
def _parsed_model_cfg(lora: bool) -> Dict[str, Any]:
    from mmengine.config import Config

    name = "stage_2_lora.py" if lora else "stage_2.py"
    return Config.fromfile(os.path.join(REPO, "configs", "slidechat", name)).model.to_dict()


def llm_config(llm: str, layers: Optional[int]) -> Any:
    from transformers import Qwen2Config

    shape = dict(LLM_SHAPES[llm])
    if layers:
        shape["num_hidden_layers"] = layers
    ids = dict(bos_token_id=151643, eos_token_id=151645) if shape["vocab_size"] > 151645 else {}
    return Qwen2Config(use_cache=False, **ids, **shape)


def write_llm_folder(folder: str, llm: str, layers: Optional[int], dtype: str, device: str = "cpu") -> None:
    """config.json + random safetensors weights, so the training loader reads it like a real folder.
    The random init runs on ``device`` (a 7B init is minutes on CPU, seconds on a GPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = llm_config(llm, layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=_torch_dtype(dtype))
    model.save_pretrained(folder, safe_serialization=True)
    del model


def _torch_dtype(name: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def build_train_model(folder: str, lora: bool, dtype: str, device: str) -> Any:
    """``SlideChatTrainModel`` from the training config, the LLM read from ``folder`` by its loader."""
    import torch

    from slidechat.engine.train_model import SlideChatTrainModel

    cfg = training_model_cfg(lora)
    cfg.pop("type")
    cfg["pretrained_pth"] = None  # no stage-1 weights: random encoder/projector, same shapes
    cfg["llm"] = dict(cfg["llm"], pretrained_model_name_or_path=folder, torch_dtype=_torch_dtype(dtype))
    model = SlideChatTrainModel(**cfg)
    return model.to(torch.device(device)).train()


def make_batch(patches: int, vocab: int, device: str) -> Dict[str, Any]:
    """One collated stage-2 row: prompt with the slide placeholder, then a labelled answer."""
    import torch

    from slidechat.model.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, PROMPT_TOKENS + ANSWER_TOKENS), generator=g)
    ids[0, PROMPT_TOKENS // 2] = IMAGE_TOKEN_INDEX
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -ANSWER_TOKENS:] = ids[0, -ANSWER_TOKENS:]
    feats = [torch.randn(patches, 512, generator=g).to(device)]
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device), "features": feats, "coords": None}


# ------------------------------------------------------------------------------------------ one step


def _loss(model: Any, data: Dict[str, Any], path: str) -> Any:
    if path == "stock":  # before label_logits: full-vocabulary logits at every position
        return model.core(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                          features=data["features"], coords=None, labels=data["labels"],
                          full_logits=True).loss
    return model(data, mode="loss")["loss"]  # what training runs


def run_step(folder: str, path: str, patches: int, lora: bool, dtype: str, device: str, threads: int,
             warmup: int) -> Dict[str, Any]:
    """Child process: build the model, then time forward + backward of one step and read its peak."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    t_build = time.perf_counter()
    model = build_train_model(folder, lora, dtype, device)
    data = make_batch(patches, model.llm.config.vocab_size, device)
    build_s = time.perf_counter() - t_build
    cuda = device.startswith("cuda")
    amp = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step() -> float:
        with amp:
            loss = _loss(model, data, path)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = status_kib("VmRSS") * 1024
        reset_peak_rss()
    t0 = time.perf_counter()
    # zero_grad(set_to_none) inside step frees gradients: read the peak, which saw them, not the end state
    loss = step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else status_kib("VmHWM") * 1024
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"path": path, "patches": patches, "seconds": seconds, "build_s": build_s, "loss": loss,
            "before_gib": before / 2**30, "peak_gib": peak / 2**30, "above_gib": (peak - before) / 2**30,
            "positions": PROMPT_TOKENS + ANSWER_TOKENS - 1 + patches, "trainable": n_train,
            "layers": model.llm.config.num_hidden_layers}


# ------------------------------------------------------------------------------------------ ZeRO


def count_params(llm: str, lora: bool) -> Tuple[int, int, int, int]:
    """(total, trainable, llm-only, largest layer) of the stage-2 model, built on the meta device.

    Nothing is allocated; shared (tied) tensors count once, as DeepSpeed's ``model_to_params`` counts
    them (it dedups by ``data_ptr``, which is 0 for every meta tensor, so this dedups by identity).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from slidechat.engine.train_model import SlideChatTrainModel

    cfg = training_model_cfg(lora)
    cfg.pop("type")
    cfg["pretrained_pth"] = None
    with torch.device("meta"):  # the LLM only; the slide encoder + projector are small and built for real
        cfg["llm"] = AutoModelForCausalLM.from_config(llm_config(llm, None), dtype=torch.bfloat16)
    model = SlideChatTrainModel(**cfg)
    uniq = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in uniq)
    trainable = sum(p.numel() for p in uniq if p.requires_grad)
    base = {id(p): p for n, p in model.named_parameters() if n.startswith("llm.") and "lora_" not in n}
    llm_only = sum(p.numel() for p in base.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, trainable, llm_only, largest


def zero_rows(llm: str) -> List[Dict[str, Any]]:
    """Per-GPU model-state memory from DeepSpeed's estimators (the functions the ``*_all_cold`` helpers
    print from), no offload and optimizer offloaded to CPU, ZeRO-2 and ZeRO-3, 1 and 8 GPUs.

    DeepSpeed's estimators assume every parameter is trained. For LoRA they get the trainable count and
    the frozen base weights are added as bf16 (2 B each; split over GPUs under ZeRO-3, whole on every
    GPU under ZeRO-2) -- that addition is ours, said so in the table.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = []
    for lora in (False, True):
        total, trainable, llm_only, largest = count_params(llm, lora)
        frozen = total - trainable
        for stage in (2, 3):
            for gpus in (1, 8):
                out = {"config": "stage_2_lora.py (LoRA r=64)" if lora else "stage_2.py (full)",
                       "stage": stage, "gpus": gpus, "total": total, "trainable": trainable,
                       "llm": llm_only, "largest": largest}
                for offload in (False, True):
                    if stage == 2:
                        cpu, gpu = estimate_zero2_model_states_mem_needs(
                            trainable, num_gpus_per_node=gpus, cpu_offload=offload)
                        gpu += 2 * frozen
                    else:
                        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                            trainable, largest, num_gpus_per_node=gpus, cpu_offload=offload,
                            cpu_offload_params=False)
                        gpu += 2 * frozen // gpus
                    out["offload" if offload else "gpu"] = gpu
                    if offload:
                        out["offload_cpu"] = cpu  # per node
                # the usual mixed-precision AdamW split (bf16 weights 2 B, bf16 grads 2 B, fp32 master
                # weights + Adam m + v 12 B per trained parameter), partitioned as the stage partitions
                out["w"] = 2 * total / (gpus if stage == 3 else 1)
                out["g"] = 2 * trainable / gpus
                out["o"] = 12 * trainable / gpus
                rows.append(out)
    return rows


def _gib(n: float) -> str:
    g = n / 2**30
    return f"{g:.1f}" if g >= 1 else f"{g:.2f}"


def print_zero(llm: str) -> List[Dict[str, Any]]:
    """Print the ZeRO table; returns its rows."""
    rows = zero_rows(llm)
    full = rows[0]
    print(f"\n### ZeRO model-state memory per GPU, {llm} stage-2 configs (DeepSpeed estimators)\n")
    print(f"parameters counted on the meta device from the config: LLM {full['llm']:,} = {full['llm'] / 1e9:.3f} B "
          f"(published {PUBLISHED[llm] / 1e9:.2f} B), whole stage-2 model {full['total'] / 1e9:.3f} B "
          f"(slide encoder + projector {(full['total'] - full['llm']) / 1e6:.1f} M), largest layer "
          f"{full['largest'] / 1e6:.0f} M; LoRA trainable: {rows[-1]['trainable'] / 1e6:.1f} M\n")
    print("| config | ZeRO | GPUs | trained params | weights (GiB) | grads (GiB) | optimizer (GiB) | "
          "DeepSpeed estimate, no offload (GiB) | optimizer offloaded to CPU: GPU (GiB) | and CPU RAM per node (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['stage']} | {r['gpus']} | {r['trainable'] / 1e9:.3f} B | "
              f"{_gib(r['w'])} | {_gib(r['g'])} | {_gib(r['o'])} | {_gib(r['gpu'])} | {_gib(r['offload'])} | "
              f"{_gib(r['offload_cpu'])} |")
    print("\nweights / grads / optimizer: bf16 weights (all params), bf16 grads and fp32 master + AdamW m, v "
          "(trained params), divided as the stage partitions them (our arithmetic). DeepSpeed columns: "
          "estimate_zero{2,3}_model_states_mem_needs (what the *_all_cold helpers print), given the trained "
          "count; for LoRA the frozen base is added as bf16 weights (ours). Activations are not included: "
          "see the step table.")
    return rows


# ------------------------------------------------------------------------------------------ driver


def _child(args: argparse.Namespace, folder: str, path: str, patches: int) -> Dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path, "--folder", folder,
           "--patches", str(patches), "--dtype", args.dtype, "--device", args.device,
           "--threads", str(args.threads), "--warmup", str(args.warmup)] + (["--lora"] if args.lora else [])
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"step at {patches} patches ({path}) failed: exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def print_steps(args: argparse.Namespace, rows: List[Dict[str, Any]], full_layers: int) -> None:
    r0 = rows[0]
    layers = r0["layers"]
    what = "LoRA r=64 (stage_2_lora.py)" if args.lora else "full fine-tune (stage_2.py)"
    print(f"\n### One stage-2 step, {args.llm} shape, {layers} of {full_layers} decoder layers, {what}\n")
    print(f"{args.device}, {args.dtype} ({'LLM weights bf16 + bf16 autocast' if args.dtype == 'bf16' else 'fp32'}),"
          f" {args.threads} threads, activation checkpointing on, {PROMPT_TOKENS + ANSWER_TOKENS} text tokens "
          f"({ANSWER_TOKENS} labelled), batch 1, warm-up steps {args.warmup}; {r0['trainable'] / 1e6:.1f} M "
          f"trainable parameters; {platform.node() or 'host'}, {_load()} at the end\n")
    mem = "peak GPU memory allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"| patches | LM head | seconds | s per 1k patches | {mem} (GiB) | above model (GiB) | loss |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        head = "all positions (stock, before)" if r["path"] == "stock" else "labelled positions (training)"
        print(f"| {r['patches']:,} | {head} | {r['seconds']:.1f} | {1000 * r['seconds'] / r['patches']:.2f} | "
              f"{r['peak_gib']:.2f} | {r['above_gib']:.2f} | {r['loss']:.4f} |")
    lab = [r for r in rows if r["path"] == "labels"]
    if len(lab) >= 2:
        a, b = lab[0], lab[-1]
        print(f"\n{a['patches']:,} -> {b['patches']:,} patches (x{b['patches'] / a['patches']:.1f}): time "
              f"x{b['seconds'] / a['seconds']:.2f}, memory above model x{b['above_gib'] / a['above_gib']:.2f}")
    for s in (r for r in rows if r["path"] == "stock"):
        n = next((r for r in lab if r["patches"] == s["patches"]), None)
        if n:
            print(f"label logits at {s['patches']:,} patches: time x{s['seconds'] / n['seconds']:.2f} less, "
                  f"memory above model x{s['above_gib'] / n['above_gib']:.2f} less "
                  f"({s['above_gib'] - n['above_gib']:.2f} GiB saved); losses {s['loss']:.6f} / {n['loss']:.6f}")
    if layers != full_layers:
        print(f"\n{layers} of {full_layers} layers measured. The decoder-layer part of time and activation "
              f"memory grows with the layer count; a full-depth figure is an extrapolation, not a measurement.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("all", "steps", "zero"), default="all")
    ap.add_argument("--llm", choices=sorted(LLM_SHAPES), default="qwen2.5-0.5b")
    ap.add_argument("--layers", type=int, default=None,
                    help=f"decoder layers (default: the real count on CUDA, {CPU_DEFAULT_LAYERS} on a CPU, where "
                         "the 24-layer 0.5B step at 10k patches takes tens of minutes on 2 cores)")
    ap.add_argument("--patches", type=int, nargs="+", default=[1000, 5000, 10000])
    ap.add_argument("--compare-at", type=int, nargs="*", default=None,
                    help="sizes that also run the stock full-logits step (default: the smallest)")
    ap.add_argument("--lora", action="store_true", help="stage_2_lora.py instead of stage_2.py")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 0 CPU, 1 CUDA)")
    ap.add_argument("--zero-llm", default="qwen2.5-7b", choices=("qwen2.5-7b",))
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--tiny", action="store_true", help="tiny LLM (64 wide, 2 layers), 64 patches, both LM "
                    "head paths: seconds, what the test suite runs")
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=("stock", "labels"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.device.startswith("cuda") else 0
    if args.layers is None and not args.device.startswith("cuda") and not args.tiny:
        args.layers = CPU_DEFAULT_LAYERS
    if args.child:
        print(json.dumps(run_step(args.folder, args.child, args.patches[0], args.lora, args.dtype,
                                  args.device, args.threads, args.warmup)))
        return 0
    if args.tiny:
        args.llm, args.patches = "tiny", [64]
    compare = args.compare_at if args.compare_at is not None else [min(args.patches)]
    result: Dict[str, Any] = {"args": vars(args)}
    if args.part in ("all", "steps"):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="real_size_llm_") as folder:
            write_llm_folder(folder, args.llm, args.layers, args.dtype, args.device)
            if args.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()  # the children need the whole GPU
            rows = []
            for n in sorted(args.patches):
                if n in compare:
                    rows.append(_child(args, folder, "stock", n))
                rows.append(_child(args, folder, "labels", n))
                for r in rows[-2 if n in compare else -1:]:  # every figure, as soon as it exists
                    print(f"  {r['patches']} patches, {r['path']}: {json.dumps(r)}", flush=True)
        print_steps(args, rows, LLM_SHAPES[args.llm]["num_hidden_layers"])
        print(f"\n(wall time of the whole run: {time.perf_counter() - t0:.0f} s)")
        result["steps"] = rows
    if args.part in ("all", "zero") and not args.tiny:
        result["zero"] = print_zero(args.zero_llm)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

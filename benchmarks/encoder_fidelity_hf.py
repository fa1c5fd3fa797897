"""Full-size fidelity of the transformers and CONCH-v1.5 presets (``phikon``, ``phikon_v2``, ``conch_v1_5``):
every block the card has, random weights, against the references of ``tests/test_encoder_presets_hf.py``
(the cards' own definitions: transformers ``from_pretrained`` + image processors, TITAN's forward written
out), on synthetic tissue patches at the model's size and at sizes that need the resize.

    python benchmarks/encoder_fidelity_hf.py [--names phikon,phikon_v2,conch_v1_5] [--threads N]

CI builds the same presets with one block (the test); this is the one full-size check per family. Prints
one row per preset: parameters of the built encoder, output width, the minimum cosine over patches (per
processor backend for the transformers presets: ``pil`` = transformers 4.x's processors, the cards' era;
``torchvision`` = transformers 5's ``AutoImageProcessor`` default; ``titan`` = TITAN's torchvision
transform) and the seconds the case took (writing the random
checkpoint, building both models, running both pipelines). Needs ~5 GB of RAM for the ViT-L cases.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the test module's reference builders (one copy of them)

FULL_DEPTH = {"phikon": 12, "phikon_v2": 24, "conch_v1_5": 24}


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_transformers(name: str, tmp: Path) -> Dict[str, object]:
    import torch

    import test_encoder_presets_hf as ref
    from slidechat.features.encoders import build_encoder

    depth = FULL_DEPTH[name]
    weights = ref.write_hub_checkpoint(tmp / name, name, depth=depth)
    patches = ref.tissue_patches((224, 448, 512))
    enc = build_encoder(name, weights)
    with torch.inference_mode():
        ours = torch.cat([enc(torch.from_numpy(p)[None]) for p in patches])
    refs = ref.hf_reference(name, weights, patches)
    cos = {backend: min(ref.cosines(ours, r)) for backend, r in refs.items()}
    return {"params": _params(enc), "dim": int(ours.shape[1]), "cos": cos, "patches": len(patches)}


def check_conch_v1_5(tmp: Path) -> Dict[str, object]:
    import torch

    import test_encoder_presets_hf as ref
    from slidechat.features.encoders import build_encoder

    depth = FULL_DEPTH["conch_v1_5"]
    sd = ref.titan_conch_state_dict(depth)
    path = tmp / "conch_v1_5_pytorch_model.bin"
    torch.save(sd, path)
    patches = ref.tissue_patches((512, 448, 512), seed=7)
    enc = build_encoder("conch_v1_5", path)
    with torch.inference_mode():
        ours = torch.cat([enc(torch.from_numpy(p)[None]) for p in patches])
        refs = torch.cat([ref.titan_conch_reference(sd, ref.titan_transform([p]), depth) for p in patches])
    return {"params": _params(enc), "dim": int(ours.shape[1]), "cos": {"titan": min(ref.cosines(ours, refs))},
            "patches": len(patches)}


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--names", default="phikon,phikon_v2,conch_v1_5")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"{'name':<11} {'blocks':>6} {'params':>12} {'dim':>5} {'patches':>7}  "
          f"{'min cosine over patches (reference pipeline: 1 - cos)':<56} {'seconds':>8}")
    for name in [n.strip() for n in args.names.split(",") if n.strip()]:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            row = check_conch_v1_5(Path(tmp)) if name == "conch_v1_5" else check_transformers(name, Path(tmp))
        secs = time.perf_counter() - start
        cos = ", ".join(f"{k}: {v:.9f} ({1 - v:.1e})" for k, v in row["cos"].items())
        print(f"{name:<11} {FULL_DEPTH[name]:>6} {row['params']:>12,} {row['dim']:>5} {row['patches']:>7}  "
              f"{cos:<56} {secs:>8.1f}", flush=True)


if __name__ == "__main__":
    main()

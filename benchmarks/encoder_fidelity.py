"""Each timm ViT preset, and MUSK, at full size against its model card (issue 15, "one full-size check per
family").

The reference is the card's own definition from ``tests/encoder_references.py`` (the card's
``timm.create_model`` arguments at full depth, or for MUSK torchscale's ``BEiT3`` in MUSK's wrapper; its
torchvision transform on PIL images, its output rule),
with random weights (every block counts: see ``randomize_``) saved to a safetensors file by the
reference's key names; then ``build_encoder(name, file)`` runs on the same uint8 patches. Printed per
preset: parameters, feature dimension, the smallest per-patch cosine (target >= 0.99999) and the seconds
the whole check took. One model lives at a time (the reference is freed before the preset is built), so the
peak is about twice the largest model (H-optimus / GigaPath: 1.1 B parameters, ~9 GB).

    python benchmarks/encoder_fidelity.py                       # every preset above, markdown table
    python benchmarks/encoder_fidelity.py --presets h0_mini uni --patches 1
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from encoder_references import REFERENCES, min_cosine, randomize_, reference_features, tissue_patches  # noqa: E402

from slidechat.features.encoders import build_encoder  # noqa: E402

MIN_COSINE = 0.99999


def check(name: str, n_patches: int, workdir: Path) -> Dict[str, str]:
    """Reference features, then the preset's on the same patches, one model in memory at a time."""
    t0 = time.perf_counter()
    ref = REFERENCES[name]
    patches = {size: tissue_patches(size, n_patches, seed=7, first_class=k * n_patches)
               for k, size in enumerate(ref.sizes)}
    model = randomize_(ref.model(None), seed=0)
    params = sum(p.numel() for p in model.parameters())
    path = workdir / f"{name}.safetensors"
    save_file(model.state_dict(), str(path))
    want = {size: reference_features(ref, model, p) for size, p in patches.items()}
    del model
    gc.collect()
    encoder = build_encoder(name, path)
    with torch.inference_mode():
        got = {size: encoder(torch.from_numpy(p)) for size, p in patches.items()}
    dim = int(encoder.embed_dim)
    del encoder
    gc.collect()
    path.unlink()
    cos = min(min_cosine(got[s], want[s]) for s in patches)
    shapes_ok = all(got[s].shape == want[s].shape == (n_patches, dim) for s in patches)
    return {"name": name, "params": f"{params / 1e6:.1f} M", "dim": str(dim),
            "sizes": "/".join(f"{s}px" for s in ref.sizes), "min cosine": f"{cos:.9f}",
            "ok": "yes" if cos >= MIN_COSINE and shapes_ok and dim == ref.dim else "NO",
            "seconds": f"{time.perf_counter() - t0:.0f}"}


def markdown(rows: List[Dict[str, str]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=list(REFERENCES), choices=list(REFERENCES))
    ap.add_argument("--patches", type=int, default=2, help="patches per size (each preset checks 2 sizes)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="encoder_fidelity_") as tmp:
        for name in args.presets:
            rows.append(check(name, args.patches, Path(tmp)))
            print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    print()
    print(markdown(rows))
    return 0 if all(r["ok"] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

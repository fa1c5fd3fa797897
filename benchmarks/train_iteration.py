"""Tiny-model training iteration time (forward + backward + AdamW step), stage 1 vs stage 2, on CPU.

    python benchmarks/train_iteration.py --patches 256 --iters 10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=256)
    ap.add_argument("--text", type=int, default=128, help="text tokens per row")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from slidechat.engine.train_model import SlideChatTrainModel
    from slidechat.model.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from slidechat.model.tiny_llm import make_tiny_llm

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        folder = make_tiny_llm(d)
        enc = dict(embed_dim=512, ffn_dim=256, num_heads=8, num_layers=1,
                   segment_lengths=[64, 128, 256], dilated_ratios=[1, 2, 4], dropout=0.0, drop_path=0.0)
        for stage, freeze in (("1", True), ("2", False)):
            model = SlideChatTrainModel(
                llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=folder),
                slidechat_config=dict(feature_dim=512, encoder=enc), freeze_llm=freeze, train_stage=stage)
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            ids = torch.randint(0, 500, (args.batch, args.text))
            ids[:, 3] = IMAGE_TOKEN_INDEX
            labels = ids.clone()
            labels[:, :4] = IGNORE_INDEX
            data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                    "features": [torch.randn(args.patches, 512) for _ in range(args.batch)], "coords": None}
            times = []
            for i in range(args.iters + 2):
                t0 = time.perf_counter()
                loss = model(data, mode="loss")["loss"]
                loss.backward()
                opt.step()
                opt.zero_grad()
                if i >= 2:  # warm-up iterations not timed
                    times.append(time.perf_counter() - t0)
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"stage {stage}: batch {args.batch} x ({args.text} text + {args.patches} patches), "
                  f"{n_train} trainable params: median {statistics.median(times) * 1000:.1f} ms/iter "
                  f"(min {min(times) * 1000:.1f}, {args.iters} iters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

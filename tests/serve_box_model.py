"""A tiny Qwen2-VL that always answers one sentence holding a box, so tests can check where boxes land.

``teach_box_model(qwen2vl_dir, out_dir, answer)`` copies the tiny random Qwen2-VL and overfits it (plain
torch loop, AdamW, fixed seed, a few seconds on CPU) to answer :data:`BOX_QUESTION` with ``answer``
whatever image it is shown: it is trained on images of several sizes and contents, with the prompt built
exactly as :class:`slidechat.apps.chat.ImageChatSession` builds it (``_item`` + the family's batch), so
the greedy answer at serve time is ``answer``. Only the language model is trained (the vision tower's
output is computed once per picture), which keeps it to seconds. The function checks the answer on
pictures it did not train on and raises otherwise. The result is cached in ``out_dir`` (``BOX_MODEL_READY``
holds the question and answer).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

BOX_QUESTION = "Where is the atypical cell?"
BOX_ANSWER = "Atypical cell: <region>40 60 120 140</region>."
READY = "BOX_MODEL_READY"


def _images(seed: int, sizes: Sequence[int]) -> List[Image.Image]:
    """Varied pictures (noise, flat colours, blobs on pale ground like a smear) so the answer cannot
    depend on what is shown."""
    rng = np.random.default_rng(seed)
    out = []
    for k, side in enumerate(sizes):
        h = int(side * rng.uniform(0.7, 1.0)) if k % 2 else side
        kind = k % 3
        if kind == 0:
            arr = (rng.random((h, side, 3)) * 255).astype(np.uint8)
        elif kind == 1:
            arr = np.empty((h, side, 3), np.uint8)
            arr[:] = rng.integers(0, 256, 3)
        else:
            arr = np.full((h, side, 3), 235, np.uint8)
            yy, xx = np.mgrid[:h, :side]
            for _ in range(12):
                cy, cx, r = rng.integers(0, h), rng.integers(0, side), rng.integers(6, 30)
                arr[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(60, 200, 3)
        out.append(Image.fromarray(arr))
    return out


def teach_box_model(qwen2vl_dir: Path, out_dir: Path, answer: str = BOX_ANSWER, question: str = BOX_QUESTION,
                    steps: int = 120, seed: int = 0, images: Optional[Sequence[Image.Image]] = None) -> Path:
    """``out_dir``: the tiny Qwen2-VL of ``qwen2vl_dir`` taught to answer ``question`` with ``answer``."""
    import torch

    from slidechat.apps.chat import ImageChatSession, load_image_chat_model

    out = Path(out_dir)
    stamp = f"{question}\n{answer}"
    if (out / READY).is_file() and (out / READY).read_text() == stamp:
        return out
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(qwen2vl_dir, out)
    torch.manual_seed(seed)
    model, processor = load_image_chat_model(out, device="cpu", dtype="fp32")
    train = list(images) if images is not None else _images(seed, [112, 224, 384, 512, 768, 1024, 160, 640, 900])
    batches = []
    for img in train:
        s = ImageChatSession(model, processor, img, max_new_tokens=64)
        item = s._item(question)
        inputs = s.family._inputs([item])
        tok = s.family.tokenizer
        target = tok.encode(answer, add_special_tokens=False) + [int(s.family.stop_ids[0])]
        n = int(inputs["input_ids"].shape[1])
        ids = torch.cat([inputs["input_ids"], torch.tensor([target])], dim=1)
        batch = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
        if "mm_token_type_ids" in inputs:
            batch["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros((1, len(target)), dtype=inputs["mm_token_type_ids"].dtype)],
                dim=1)
        labels = torch.full_like(ids, -100)
        labels[0, n:] = torch.tensor(target)
        batch["labels"] = labels
        with torch.no_grad():  # the vision tower stays as it is: its output is computed once per picture
            batch["mm_encoder_outputs"] = {"image": model.model.get_image_features(
                batch.pop("pixel_values"), batch["image_grid_thw"], return_dict=True)}
        batches.append(batch)
    model.train()
    # the language model learns to say the sentence whatever the image tokens are; the vision tower stays
    params = [p for n, p in model.named_parameters() if ".visual." not in f".{n}"]
    for n, p in model.named_parameters():
        p.requires_grad_(".visual." not in f".{n}")
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    losses: List[float] = []
    for step in range(steps):
        b = batches[step % len(batches)]
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if len(losses) >= 2 * len(batches) and max(losses[-len(batches):]) < 0.005:
            break  # every training picture answered near-certainly: enough
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    # greedy answers on pictures it never saw, through the serve path's session
    for img in _images(seed + 1, [300, 700, 1024]):
        got = ImageChatSession(model, processor, img, max_new_tokens=64).ask(question)
        if got != answer:
            raise AssertionError(f"box model not taught (last loss {losses[-1]:.4f}, {len(losses)} steps): "
                                 f"answered {got!r}")
    (out / READY).write_text(stamp)
    return out

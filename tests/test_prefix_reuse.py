"""One prefill per slide or image (issue 14).

The reference is today's path: every row answered from its own full prompt (``--no-prefix-reuse``). With
reuse, the greedy answers must be the same tokens, for the slide family (our encoder and the released
checkpoint's ``--compat slidechat_v1`` encoder), Qwen2-VL, Qwen2.5-VL and Qwen3-VL, with groups of several
questions of different lengths; the slide encoder must run once per slide (counted); a chat turn must
neither re-run the encoder nor prefill the slide again; a killed run resumes row by row.
Everything runs on the tiny random models the suite already builds (CPU, seconds).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import List
from unittest import mock

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_testing import COLUMNS, CONFIG, build_tiny_setup, cfg_option_args  # noqa: E402

QUESTIONS = ["What is seen?", "Which tumor type is most likely present in this whole slide image?", "Grade?",
             "Describe the morphology of the tumor cells and the stroma around them."]
# (slide, questions): four questions of slide 0, two of slide 3 (its features are missing), three of
# slide 2, one of slide 5, and slide 0 again (not next to its other rows)
LAYOUT = [(0, 4), (3, 2), (2, 3), (5, 1), (0, 1)]
BATCH = 3
MAX_NEW = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_tiny_setup(tmp_path_factory.getbasetemp() / "slidechat_testing_setup")


@pytest.fixture(scope="module")
def bench(setup, tmp_path_factory):
    path = tmp_path_factory.mktemp("prefix") / "multi.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for slide, n in LAYOUT:
            for k in range(n):
                w.writerow([f"s{slide}q{k}", f"TCGA-{slide:02d}", ("BRCA", "LUAD")[slide % 2], "D", "T",
                            QUESTIONS[k], "tumor", "normal", "necrosis", "", "A"])
    return path


def run_test(setup, bench, out, *extra) -> int:
    from slidechat.cli.main import main

    return main(["test", str(CONFIG), "--checkpoint", str(setup["ckpt"]), "--test_slide_csv", str(bench),
                 "--test_output_csv", str(out), "--feature_root", str(setup["feats"]), "--batch_size",
                 str(BATCH), "--max_new_tokens", str(MAX_NEW), "--work-dir", str(Path(out).parent / "wd"),
                 *extra, "--cfg-options", *cfg_option_args(setup["overrides"])])


def read_rows(path) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def counting_encoder():
    """Patch ``SlideChatModel.encode_slides`` to count the slides it encodes."""
    from slidechat.model.slidechat_model import SlideChatModel

    real = SlideChatModel.encode_slides
    seen = {"slides": 0}

    def encode(self, features, coords=None):
        seen["slides"] += len(features)
        return real(self, features, coords)

    return mock.patch.object(SlideChatModel, "encode_slides", encode), seen


# ------------------------------------------------------------------------------------------ building blocks

def test_group_batches_keeps_order_and_never_splits_a_group():
    from slidechat.inference.loop import group_batches

    keys = ["a", "a", "a", "b", None, None, "c", "c", "c", "c", "c"]
    # runs: a a a | b | None | None | c*5; packed into <= 4 rows; the run of five is a batch of its own
    assert group_batches(keys, 4) == [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    assert group_batches([None] * 5, 2) == [[0, 1], [2, 3], [4]]  # no keys: today's fixed batches
    # a very long run is cut at GROUP_BATCHES (4) batches' worth: 9 rows at batch 2 -> 8 + 1
    assert group_batches(["x"] * 9, 2) == [list(range(8)), [8]]


def test_common_prefix_is_computed_never_assumed():
    from slidechat.model.prefix_cache import common_prefix_len

    assert common_prefix_len([[1, 2, 3, 9], [1, 2, 4, 5]]) == 2
    assert common_prefix_len([[1, 2], [1, 2, 3]]) == 1  # every row keeps one token of its own
    assert common_prefix_len([[7, 1], [8, 1]]) == 0


def test_generate_shared_equals_generate_and_shares_only_the_common_prefix(setup):
    """Text before the slide that differs between prompts (system prompts here): only the common part is
    prefilled once, and the answers are still those of the full prompts."""
    from slidechat.data.template import encode_prompt
    from slidechat.model.constants import IMAGE_TOKEN_INDEX
    from slidechat.model.slidechat_model import SlideChatModel

    model = SlideChatModel.from_pretrained(setup["exported"])
    tok = model.tokenizer
    feats = torch.randn(40, 512, generator=torch.Generator().manual_seed(0))
    vis = model.encode_slides([feats])[0]
    for systems in (["", "", "", ""], ["You are a pathologist.", "You are a helpful assistant.", "", ""]):
        ids = [encode_prompt(tok, [], q, "qwen_chat", s) for q, s in zip(QUESTIONS, systems)]
        lens: List[int] = []
        hook = model.llm.model.register_forward_pre_hook(
            lambda m, a, kw: lens.append(kw["inputs_embeds"].shape[1]) if kw.get("inputs_embeds") is not None
            else None, with_kwargs=True)
        try:
            shared, _ = model.generate_shared([torch.tensor(i) for i in ids], vis, max_batch=3,
                                              max_new_tokens=MAX_NEW)
        finally:
            hook.remove()
        full = model.generate([torch.tensor(i) for i in ids], [feats] * 4, max_new_tokens=MAX_NEW)
        assert [s.tolist() for s in shared] == [f.tolist() for f in full]
        n = 0  # the longest common token prefix, written out here
        while all(len(i) > n + 1 for i in ids) and len({i[n] for i in ids}) == 1:
            n += 1
        slide_in_prefix = IMAGE_TOKEN_INDEX in ids[0][:n]
        assert slide_in_prefix == (systems[0] == systems[1])
        # the first forward is the one prefill of those n tokens (the slide's patches in place of its
        # placeholder when it is inside); with nothing in common, today's batched call of the full rows
        if n:
            assert lens[0] == n + (len(feats) - 1 if slide_in_prefix else 0)
        else:
            assert lens[0] == max(len(i) for i in ids) - 1 + len(feats)


# ------------------------------------------------------------------------------------------ slidechat test

@pytest.mark.parametrize("compat", [None, "slidechat_v1"])
def test_slidebench_answers_are_the_same_tokens_with_one_encode_per_slide(setup, bench, tmp_path, compat):
    extra = ["--compat", compat] if compat else []
    outs, encoded = {}, {}
    for reuse in (True, False):
        out = tmp_path / f"reuse_{reuse}.csv"
        patch, seen = counting_encoder()
        with patch:
            assert run_test(setup, bench, out, *extra, *([] if reuse else ["--no-prefix-reuse"])) == 0
        outs[reuse], encoded[reuse] = out.read_bytes(), seen["slides"]
    assert outs[True] == outs[False]
    rows = read_rows(tmp_path / "reuse_True.csv")
    assert [r["ID"] for r in rows] == [f"s{s}q{k}" for s, n in LAYOUT for k in range(n)]
    answers = {r["ID"]: r["Output"] for r in rows}
    assert all(answers[f"s0q{k}"] for k in range(4))
    assert len({answers[f"s0q{k}"] for k in range(4)}) > 1  # the questions matter: not a vacuous check
    # without reuse every answerable row encodes its slide: 4 + 3 + 1 + 1 = 9 (slide 3 has no features);
    # with reuse the batches are [s0 x4] [s3 x2] [s2 x3] [s5, s0]: slide 0, slide 2 once each, the last
    # batch's two different slides together (today's path for single rows) -> 4
    assert encoded[False] == 9 and encoded[True] == 4


def test_kill_and_resume_with_reuse(setup, bench, tmp_path):
    from slidechat.model.slidechat_model import SlideChatModel

    ref = tmp_path / "ref.csv"
    assert run_test(setup, bench, ref, "--no-prefix-reuse") == 0
    out = tmp_path / "out.csv"
    real = SlideChatModel.generate_shared
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(self, *a, **k)

    with mock.patch.object(SlideChatModel, "generate_shared", dying):
        assert run_test(setup, bench, out) == 130
    # slide 0's batch and slide 3's error rows were written; slide 2's batch died in flight
    assert [r["ID"] for r in read_rows(out)] == ["s0q0", "s0q1", "s0q2", "s0q3", "s3q0", "s3q1"]
    assert run_test(setup, bench, out) == 0
    assert out.read_bytes() == ref.read_bytes()


# ------------------------------------------------------------------------------------------ chat

def test_chat_keeps_the_cache_across_turns(setup):
    from slidechat.apps.chat import ChatSession, load_chat_model
    from slidechat.features.io import load_features

    feats, coords = load_features(setup["feats"] / "LUAD" / "TCGA-01.h5")
    model, tok = load_chat_model(setup["exported"])
    turns = ["Describe the slide.", "Anything else?", "What grade, and why do you think so?"]
    answers, fed, encoder_calls = {}, {}, {}
    for reuse in (True, False):
        lens: List[int] = []
        calls = {"n": 0}
        h1 = model.llm.model.register_forward_pre_hook(
            lambda m, a, kw: lens.append(kw["inputs_embeds"].shape[1]) if kw.get("inputs_embeds") is not None
            else None, with_kwargs=True)
        h2 = model.LongNet_encoder.register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))
        try:
            s = ChatSession(model, tok, feats, coords, max_new_tokens=MAX_NEW, prefix_reuse=reuse)
            answers[reuse] = [s.ask(q) for q in turns]
            s.reset()
            answers[reuse].append(s.ask("A new question after reset."))
        finally:
            h1.remove()
            h2.remove()
        fed[reuse], encoder_calls[reuse] = lens, calls["n"]
    assert answers[True] == answers[False]
    assert encoder_calls == {True: 1, False: 1}  # the slide is encoded once per session either way
    n_patches = len(feats)
    # without reuse every turn prefills the whole conversation, slide included
    assert len(fed[False]) == 4 and all(n > n_patches for n in fed[False])
    # with reuse: turn 1 prefills its prompt (prefix, then its last token); later turns only their new
    # tokens (the previous answer as the template writes it, the new question), never the slide
    assert fed[True][0] > n_patches and fed[True][1] == 1
    assert all(n < n_patches for n in fed[True][2:])


# ------------------------------------------------------------------------------------------ Qwen2-VL family

def _tiny_vl(root: Path, arch: str) -> Path:
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "tools"))
    try:
        import make_tiny_qwen2vl as tool
    finally:
        sys.path.pop(0)
    out = root / f"tiny_{arch}"
    assert tool.main(["--arch", arch, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen2vl_questions_of_one_image_same_tokens(tmp_path, arch):
    from PIL import Image

    from slidechat.inference.loop import CytologyItem, Qwen2VLFamily, SamplingSettings
    from slidechat.model.qwen2vl import load_qwen2vl

    model, proc = load_qwen2vl(_tiny_vl(tmp_path, arch))
    rng = np.random.default_rng(0)
    imgs = []
    for i, (w, h) in enumerate([(84, 56), (56, 112), (70, 70)]):
        imgs.append(str(tmp_path / f"f{i}.png"))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(imgs[-1])
    # image 0: four questions; image 1: two questions with different system prompts (text before the
    # image differs: nothing to share); image 2: one question
    rows = [(0, q, None) for q in QUESTIONS] + [(1, QUESTIONS[0], "You are a cytopathologist."),
                                                (1, QUESTIONS[1], None), (2, QUESTIONS[2], None)]

    def items():
        return [CytologyItem(position=p, key={}, images=[imgs[i]], messages=[{"role": "user",
                             "content": "<image>" + q}], system=s, label_content=None, source=f"row {p}")
                for p, (i, q, s) in enumerate(rows)]

    texts, seen = {}, {}
    visual = model.model.visual if hasattr(model, "model") and hasattr(model.model, "visual") else model.visual
    for reuse in (True, False):
        grids: List[int] = []
        hook = visual.register_forward_pre_hook(
            lambda m, a, kw: grids.append(int((kw.get("grid_thw") if "grid_thw" in kw else a[1]).shape[0])),
            with_kwargs=True)
        fam = Qwen2VLFamily(model, proc, SamplingSettings(max_new_tokens=MAX_NEW, temperature=0.0),
                            prefix_reuse=reuse, max_batch=3, skip_special_tokens=False)
        batch = items()
        for it in batch:
            fam.prepare(it)
        try:
            texts[reuse] = fam.generate(batch)
        finally:
            hook.remove()
        seen[reuse] = sum(grids)
    assert texts[True] == texts[False]
    assert len(set(texts[True][:4])) > 1  # the questions matter: not a vacuous check
    # images through the vision tower: today one per row (7); with reuse image 0 once, image 1 per row (its
    # prompts differ before the image) and image 2 once: 1 + 2 + 1
    assert seen[False] == 7 and seen[True] == 4


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_image_chat_keeps_the_cache_across_turns(tmp_path, arch):
    """``chat --image``: later turns neither run the vision tower again nor prefill the image; the answers
    are those of a full prefill every turn."""
    from PIL import Image

    from slidechat.apps.chat import ImageChatSession
    from slidechat.model.qwen2vl import load_qwen2vl

    model, proc = load_qwen2vl(_tiny_vl(tmp_path, arch))
    img = tmp_path / "f.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (70, 84, 3), dtype=np.uint8)).save(img)
    visual = model.model.visual if hasattr(model, "model") and hasattr(model.model, "visual") else model.visual
    answers, vision_runs = {}, {}
    for reuse in (True, False):
        calls = {"n": 0}
        hook = visual.register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))
        try:
            chat = ImageChatSession(model, proc, img, max_new_tokens=MAX_NEW, prefix_reuse=reuse)
            # two turns, then reset (a third turn would feed the random model's own "<|video_pad|>" back
            # to Qwen3-VL as a video without one: a refusal of today's path too)
            answers[reuse] = [chat.ask(q) for q in QUESTIONS[:2]]
            chat.reset()
            answers[reuse].append(chat.ask(QUESTIONS[3]))
        finally:
            hook.remove()
        vision_runs[reuse] = calls["n"]
    assert answers[True] == answers[False]
    # today every turn runs the vision tower (3); with reuse only the first turn: even after reset the new
    # prompt starts with the same system, user header and image, so the kept cache is cropped after them
    assert vision_runs[False] == 3 and vision_runs[True] == 1

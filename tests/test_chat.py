"""``slidechat chat``: two turns through a scripted stdin; the second prompt carries the first turn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_testing import CONFIG, build_tiny_setup  # noqa: E402

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_tiny_setup(tmp_path_factory.getbasetemp() / "slidechat_testing_setup")


def test_chat_two_turns_scripted_stdin(setup):
    feats = setup["feats"] / "BRCA" / "TCGA-00.h5"
    q1, q2 = "What tissue is this?", "And what is the grade?"
    cmd = [str(BIN / "slidechat"), "chat", "--checkpoint", str(setup["exported"]), "--features", str(feats),
           "--max-new-tokens", "8", "--jsonl", "--show-prompt"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run(cmd, input=f"{q1}\n\n{q2}\nexit\nnever asked\n", capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    turns = [json.loads(line) for line in res.stdout.splitlines()]  # stdout holds answers only
    assert [t["turn"] for t in turns] == [1, 2]
    assert [t["question"] for t in turns] == [q1, q2]
    prompts = res.stderr.split("--- prompt (turn ")[1:]
    assert len(prompts) == 2
    first, second = (p.split(" ---\n", 1)[1].rsplit("\n---", 1)[0] for p in prompts)
    assert first.count("<image>") == 1 and q1 in first and q2 not in first
    # the second prompt is the whole conversation: slide, question 1, answer 1, question 2
    a1 = turns[0]["answer"]
    assert second.count("<image>") == 1
    assert second.index(q1) < second.index(q2)
    assert f"{q1}<|im_end|>\n<|im_start|>assistant\n{a1}" in second
    assert second.endswith(f"{q2}<|im_end|>\n<|im_start|>assistant\n")


def test_chat_session_config_checkpoint_matches_exported(setup):
    """Config + training checkpoint and the exported folder answer identically (greedy)."""
    from slidechat.engine.overrides import parse_cfg_options
    from slidechat.apps.chat import ChatSession, load_chat_model
    from slidechat.features.io import load_features

    feats, coords = load_features(setup["feats"] / "LUAD" / "TCGA-01.h5")
    opts = parse_cfg_options([f"{k}={'None' if v is None else v}" for k, v in setup["overrides"].items()])
    answers = []
    # the exported folder alone, or with a config (its LLM and slide config then win)
    for ckpt, config in ((setup["ckpt"], CONFIG), (setup["exported"], None), (setup["exported"], CONFIG)):
        model, tok = load_chat_model(ckpt, config, opts if config else None)
        s = ChatSession(model, tok, feats, coords, max_new_tokens=6)
        answers.append([s.ask("Describe the slide."), s.ask("Anything else?")])
        assert len(s.history) == 2
        ids = s.prompt_ids("Third?")
        assert ids.count(-200) == 1
        s.reset()
        assert len(s.prompt_ids("Third?")) < len(ids)
    assert answers[0] == answers[1] == answers[2]


def test_chat_session_caps_patches(setup):
    from slidechat.apps.chat import ChatSession, load_chat_model

    model, tok = load_chat_model(setup["exported"])
    feats = np.random.default_rng(0).normal(size=(700, 512)).astype(np.float32)
    s = ChatSession(model, tok, feats, None, max_new_tokens=2)
    assert s.features.shape == (model.config.max_patches_test, 512)
    assert torch.equal(s.features[0], torch.from_numpy(feats[0]))
    assert torch.equal(s.features[-1], torch.from_numpy(feats[-1]))


def test_chat_on_a_raw_slide(setup, synthetic_slides):
    """Features extracted on the fly (tiny_test encoder) from a raw .svs."""
    cmd = [str(BIN / "slidechat"), "chat", "--checkpoint", str(setup["exported"]),
           "--slide", str(synthetic_slides["tumor20"]), "--encoder", "tiny_test", "--device", "cpu",
           "--num-workers", "0", "--max-new-tokens", "4", "--jsonl"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run(cmd, input="What is this?\n", capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    turns = [json.loads(line) for line in res.stdout.splitlines()]  # stdout holds answers only
    assert [t["turn"] for t in turns] == [1]
    assert "patches encoded with tiny_test" in res.stderr

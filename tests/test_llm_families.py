"""The slide model on other causal LMs: tiny Qwen2.5 (its official template), Qwen3 and Llama 3.1.

Expectations come from the reference rule, not from our encoder: the prompt ids are
``tokenizer.apply_chat_template(..., tokenize=True)``'s (the tokenizers carry the families' real chat
templates, see ``slidechat.model.llm_templates``), and the labelled tokens are, turn by turn, the assistant's
answer and the family's end-of-turn token, nothing else. Then stock ``xtuner train`` stage 1 -> stage 2 ->
``xtuner test`` on each family, the prompt format switched by config keys only. (Their loss at labelled
positions: tests/test_label_logits.py.)
"""

from __future__ import annotations

import csv
import sys
import uuid
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple
from unittest import mock

import pytest
import torch

from slidechat.data.template import (CHAT_TEMPLATE, ConversationError, config_template, encode_conversation,
                                     encode_prompt, get_vision_template, render_chat_template, resolve_template,
                                     tokenize_pairs)
from slidechat.model.constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX

REPO = Path(__file__).resolve().parents[1]

#: arch -> (make_tiny_llm options, the end-of-turn token its template writes after an answer)
FAMILIES: Dict[str, Tuple[Dict[str, Any], str]] = {
    "qwen2": (dict(arch="qwen2", official_template=True), "<|im_end|>"),
    "qwen3": (dict(arch="qwen3"), "<|im_end|>"),
    "llama": (dict(arch="llama"), "<|eot_id|>"),
}

SINGLE = [{"from": "human", "value": "<image>\nWhat is the most likely diagnosis?"},
          {"from": "gpt", "value": "The most likely diagnosis is carcinoma."}]
# history answers starting with a newline (and one with a trailing one), <image> not at the front
MULTI = [{"from": "human", "value": "Please describe the slide in detail. <image>"},
         {"from": "gpt", "value": "\nThe tumor cells have enlarged nuclei."},
         {"from": "human", "value": "What grade is the tumor?"},
         {"from": "gpt", "value": "\nThe tumor is poorly differentiated.\n"},
         {"from": "human", "value": "Is there any invasion?"},
         {"from": "gpt", "value": "Yes. There is perineural invasion."}]
CASES = [("single", SINGLE, ""), ("multi", MULTI, ""), ("system", MULTI, "The patient is a woman.")]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> Dict[str, Any]:
    from transformers import AutoTokenizer

    from slidechat.model.tiny_llm import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("family_tokenizers")
    out = {}
    for arch, (opts, _) in FAMILIES.items():
        build_tiny_tokenizer(**opts).save_pretrained(root / arch)  # loaded back as a real folder is
        out[arch] = AutoTokenizer.from_pretrained(root / arch)
    return out


def reference_messages(conversation: Sequence[Dict[str, str]], system: str) -> List[Dict[str, str]]:
    """The conversation as chat messages, the slide placeholder in front of the first question (where
    SlideChat puts it)."""
    msgs = [{"role": "system", "content": system}] if system else []
    for k, m in enumerate(conversation):
        text = m["value"].replace(IMAGE_TOKEN, "").strip() if m["from"] == "human" else m["value"]
        if k == 0:
            text = f"{IMAGE_TOKEN}\n{text}"
        msgs.append({"role": "user" if m["from"] == "human" else "assistant", "content": text})
    return msgs


def reference_ids(tok: Any, messages: List[Dict[str, str]], **kwargs: Any) -> List[int]:
    out = tok.apply_chat_template(messages, tokenize=True, enable_thinking=False, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def with_placeholder_text(tok: Any, ids: Sequence[int]) -> List[int]:
    """Our ids with the IMAGE_TOKEN_INDEX written back as the ``<image>`` text's tokens."""
    assert list(ids).count(IMAGE_TOKEN_INDEX) == 1
    p = list(ids).index(IMAGE_TOKEN_INDEX)
    return list(ids[:p]) + tok(IMAGE_TOKEN, add_special_tokens=False)["input_ids"] + list(ids[p + 1:])


def label_runs(labels: Sequence[int]) -> List[List[int]]:
    runs: List[List[int]] = []
    prev = IGNORE_INDEX
    for x in labels:
        if x != IGNORE_INDEX:
            if prev == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(x)
        prev = x
    return runs


# ------------------------------------------------------------------------------------------ prompts and labels
@pytest.mark.parametrize("arch", list(FAMILIES))
@pytest.mark.parametrize("case,conversation,system", CASES, ids=[c[0] for c in CASES])
def test_training_ids_equal_apply_chat_template_and_labels_cover_answers(tokenizers, arch, case,
                                                                        conversation, system):
    tok, eot = tokenizers[arch], FAMILIES[arch][1]
    enc = encode_conversation(tok, conversation, CHAT_TEMPLATE, system)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels) and labels[ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX
    assert with_placeholder_text(tok, ids) == reference_ids(tok, reference_messages(conversation, system))
    answers = [m["value"] for m in conversation if m["from"] == "gpt"]
    runs = label_runs(labels)
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        text = tok.decode(run)
        # the answer (its own leading newline only where the tokenizer keeps it apart from the
        # template's) and the end-of-turn token; trailing whitespace of the answer before it
        assert text.endswith(eot) and text.count(eot) == 1, text
        body = text[:-len(eot)]
        assert body.strip() == answer.strip() and answer.startswith(body[:len(body) - len(body.lstrip())])
    # every label is the id at its position (nothing shifted)
    assert all(x == IGNORE_INDEX or x == i for x, i in zip(labels, ids))


@pytest.mark.parametrize("arch", list(FAMILIES))
@pytest.mark.parametrize("case,conversation,system", CASES, ids=[c[0] for c in CASES])
def test_generation_prompt_equals_apply_chat_template(tokenizers, arch, case, conversation, system):
    tok = tokenizers[arch]
    qs = [m["value"] for m in conversation if m["from"] == "human"]
    answers = [m["value"] for m in conversation if m["from"] == "gpt"]
    history = list(zip(qs[:-1], answers[:-1]))
    ids = encode_prompt(tok, history, qs[-1], CHAT_TEMPLATE, system)
    ref = reference_ids(tok, reference_messages(conversation[:-1], system), add_generation_prompt=True)
    assert with_placeholder_text(tok, ids) == ref


def test_qwen3_think_block_last_turn_only_and_never_labelled(tokenizers):
    """Qwen3's template writes an empty think block before the answer after the last question (and in the
    thinking-off generation prompt), none before history answers; the block is prompt, not label."""
    tok = tokenizers["qwen3"]
    think = "<think>\n\n</think>\n\n"
    pairs = [(f"{IMAGE_TOKEN}\nWhat grade is the tumor?", "\nIt is high grade."),
             ("Is there any invasion?", "Yes, perineural.")]
    text = render_chat_template(tok, pairs)
    assert text.count(think) == 1 and text.endswith(f"<|im_start|>assistant\n{think}Yes, perineural.<|im_end|>\n")
    assert "<|im_start|>assistant\n\nIt is high grade.<|im_end|>" in text  # history: as given, no block
    ids, labels = tokenize_pairs(tok, pairs, CHAT_TEMPLATE)
    think_ids = {tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>")}
    assert think_ids <= set(ids) and not think_ids & set(labels)
    prompt = encode_prompt(tok, pairs[:1], pairs[1][0], CHAT_TEMPLATE)
    assert tok.decode(with_placeholder_text(tok, prompt)).endswith(f"<|im_start|>assistant\n{think}")
    # thinking asked for: the generation prompt leaves the block to the model, as the template does
    on = resolve_template(CHAT_TEMPLATE, {"enable_thinking": True})
    prompt_on = encode_prompt(tok, pairs[:1], pairs[1][0], on)
    ref_on = tok.apply_chat_template(reference_messages(
        [{"from": "human", "value": pairs[0][0]}, {"from": "gpt", "value": pairs[0][1]},
         {"from": "human", "value": pairs[1][0]}], ""), tokenize=True, add_generation_prompt=True,
        enable_thinking=True)["input_ids"]
    assert with_placeholder_text(tok, prompt_on) == list(ref_on)
    assert not tok.decode(list(ref_on)).endswith(think)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_placeholder_across_a_token_edge_is_split_as_an_added_token(tokenizers, tmp_path, arch):
    """Real byte-level vocabularies may merge the placeholder's ``>`` with the newline after it; the
    prompt is then what ``apply_chat_template`` gives once ``<image>`` is an added token."""
    from transformers import AutoTokenizer

    folder = tmp_path / arch
    tokenizers[arch].save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_tokens([">\n"])  # stands in for a learnt '>\n' merge
    enc = tok(f"x{IMAGE_TOKEN}\nWhat", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids(">\n") in enc  # the placeholder's edge is inside a token now
    conversation, system = MULTI, "The patient is a woman."
    got = encode_conversation(tok, conversation, CHAT_TEMPLATE, system)
    prompt = encode_prompt(tok, [(MULTI[0]["value"], MULTI[1]["value"])], MULTI[2]["value"], CHAT_TEMPLATE)
    ref_tok = AutoTokenizer.from_pretrained(folder)
    ref_tok.add_tokens([">\n"])
    ref_tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    img = ref_tok.convert_tokens_to_ids(IMAGE_TOKEN)

    def as_placeholder(ids):
        return [IMAGE_TOKEN_INDEX if t == img else t for t in ids]

    assert got["input_ids"] == as_placeholder(reference_ids(ref_tok, reference_messages(conversation, system)))
    assert prompt == as_placeholder(reference_ids(ref_tok, reference_messages(MULTI[:3], ""),
                                                  add_generation_prompt=True))
    assert len(label_runs(got["labels"])) == 3


def test_qwen_chat_compat_is_unchanged_by_the_choice(tokenizers):
    """The compat format never reads the tokenizer's template: same ids with the official template or not."""
    tok = tokenizers["qwen2"]
    a = encode_conversation(tok, MULTI, "qwen_chat")
    saved = tok.chat_template
    try:
        tok.chat_template = None
        b = encode_conversation(tok, MULTI, "qwen_chat")
    finally:
        tok.chat_template = saved
    assert a == b
    text = tok.decode(with_placeholder_text(tok, a["input_ids"]))
    assert text.startswith("<|im_start|>user\n<image>\n") and "system" not in text


def test_refusals_are_one_line(tokenizers):
    tok = tokenizers["qwen2"]
    pairs = [(f"{IMAGE_TOKEN}\nWhat is the most likely diagnosis?", "mor is carcinoma.")]
    saved = tok.chat_template
    try:
        # an answer glued to template letters ("tu" + "mor ...") splits a token: refused, not mislabelled
        tok.chat_template = ("{% for m in messages %}{% if m.role == 'assistant' %}{{ 'tu' + m.content + "
                             "'<|im_end|>' }}{% else %}{{ m.content }}{% endif %}{% endfor %}")
        assert len(tok(" tumor", add_special_tokens=False)["input_ids"]) < 3  # 'tumor' is merged
        with pytest.raises(ConversationError, match="answer 0 does not align with token boundaries") as e:
            tokenize_pairs(tok, pairs, CHAT_TEMPLATE)
        assert "\n" not in str(e.value)
        tok.chat_template = ("{% for m in messages %}{{ m.content }}{% endfor %}")
        with pytest.raises(ConversationError, match="no end-of-turn token after answer 0"):
            tokenize_pairs(tok, [(f"{IMAGE_TOKEN}\nQ?", " It is.")], CHAT_TEMPLATE)
        tok.chat_template = None
        with pytest.raises(ConversationError, match="tokenizer has no chat template"):
            tokenize_pairs(tok, pairs, CHAT_TEMPLATE)
    finally:
        tok.chat_template = saved
    with pytest.raises(ConversationError, match="holds 2 '<image>' strings"):
        tokenize_pairs(tok, pairs, CHAT_TEMPLATE, system=f"Slides look like {IMAGE_TOKEN}.")
    with pytest.raises(ConversationError, match="unknown chat template 'qwen3_chat'"):
        resolve_template("qwen3_chat")
    # one registry, a typed lookup per kind: a vision format is no slide format and the other way round
    with pytest.raises(ConversationError, match=r"unknown chat template 'qwen2_vl' \(known: qwen_chat, chat_template\)"):
        resolve_template("qwen2_vl")
    with pytest.raises(ConversationError, match=r"unknown template 'qwen_chat' \(known: qwen2_vl, qwen3_vl\)"):
        get_vision_template("qwen_chat")
    with pytest.raises(ConversationError, match="apply to 'chat_template' only"):
        resolve_template("qwen_chat", {"enable_thinking": True})


def test_dataset_and_config_carry_the_choice(tokenizers, tmp_path):
    """A bad prompt_template fails at construction naming the config/file; a SlideChatConfig round-trips it."""
    from slidechat.data.dataset import SlideInstructionDataset
    from slidechat.engine.train_model import SlideChatTrainModel
    from slidechat.model.slidechat_model import SlideChatConfig
    from slidechat.utils.errors import SlideChatError

    data = tmp_path / "d.json"
    data.write_text('[{"id": "a", "image": ["s"], "conversations": [{"from": "human", "value": "<image>\\nQ?"}, '
                    '{"from": "gpt", "value": "A."}]}]')
    with pytest.raises(SlideChatError, match="unknown chat template 'chatml'") as e:
        SlideInstructionDataset(data, tokenizers["llama"], template="chatml", check_files=False)
    assert str(data) in str(e.value)
    cfg = SlideChatConfig(prompt_template=CHAT_TEMPLATE, chat_template_kwargs={"enable_thinking": True})
    back = SlideChatConfig.from_dict(cfg.to_dict())
    assert config_template(back.prompt_template, back.chat_template_kwargs) == \
        resolve_template(CHAT_TEMPLATE, {"enable_thinking": True})
    assert SlideChatConfig.from_dict({"feature_dim": 512}).prompt_template == "qwen_chat"  # older exports
    bad = SlideChatConfig(prompt_template="llama3")
    with pytest.raises(SlideChatError, match="slidechat_config: unknown chat template 'llama3'"):
        config_template(bad.prompt_template, bad.chat_template_kwargs)
    with pytest.raises(SlideChatError, match="slidechat_config: unknown chat template 'llama3'"):
        SlideChatTrainModel(llm=None, slidechat_config=bad.to_dict())  # refused before the LLM is built


# ------------------------------------------------------------------------------------------ xtuner end to end
def _run_xtuner(tool: str, argv: List[str]) -> None:
    """``xtuner train|test ...`` in-process: the stock entry point's ``main`` (as tests/test_train.py)."""
    import importlib

    module = importlib.import_module(f"xtuner.tools.{tool}")
    with mock.patch.object(sys, "argv", [f"{tool}.py", *argv]):
        module.main()


def _template_options() -> List[str]:
    """The tiny configs switched to the LLM's own chat template: the config keys that carry the format
    (the same for every family: only the LLM folder differs between them)."""
    return ["prompt_template=chat_template", "model.slidechat_config.prompt_template=chat_template",
            "train_dataloader.dataset.template=chat_template"]


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_xtuner_train_stage1_stage2_then_xtuner_test(tmp_path, arch):
    from slidechat.engine.overrides import path_overrides
    from train_data import slide_train_demo

    demo = slide_train_demo(tmp_path, **FAMILIES[arch][0])
    short = ["train_cfg.max_epochs=1", "default_hooks.checkpoint.max_keep_ckpts=1",
             f"experiment_name=fam_{arch}_{uuid.uuid4().hex[:6]}"]
    wd1, wd2 = tmp_path / "stage1", tmp_path / "stage2"
    _run_xtuner("train", [str(REPO / "configs/tiny/stage_1.py"), "--work-dir", str(wd1), "--cfg-options",
                          *path_overrides(demo["llm"], demo["stage1"], demo["features"]),
                          *_template_options(), *short])
    _run_xtuner("train", [str(REPO / "configs/tiny/stage_2.py"), "--work-dir", str(wd2), "--cfg-options",
                          *path_overrides(demo["llm"], demo["stage2"], demo["features"], wd1),
                          *_template_options(), *short])
    ckpt = (wd2 / "last_checkpoint").read_text().strip()
    out = tmp_path / "test_out.csv"
    _run_xtuner("test", [str(REPO / "configs/tiny/stage_2.py"), "--checkpoint", ckpt, "--work-dir",
                         str(tmp_path / "test_wd"), "--cfg-options",
                         *path_overrides(demo["llm"]), "model.pretrained_pth=None",
                         *_template_options(), f"test_slide_csv={demo['test_vqa']}",
                         f"test_output_csv={out}", f"feature_root={demo['features']}",
                         "feature_template={feature_root}/{Slide}", "test_batch_size=8", "max_new_tokens=6"])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(demo["test_vqa"], newline="") as f:
        assert len(rows) == len(list(csv.DictReader(f))) > 0
    assert all(r["Error"] == "" for r in rows), [r["Error"] for r in rows if r["Error"]][:3]
    log = "".join(p.read_text() for p in (tmp_path / "test_wd").glob("*/*.log"))
    assert "slidebench/accuracy" in log
    fmt = "prompt format: chat_template (the tokenizer's own chat template; enable_thinking=False)"
    assert fmt in log  # the test loop took the format from the trained model's config
    for wd in (wd1, wd2):
        stage_log = "".join(p.read_text() for p in wd.glob("*/*.log"))
        assert f"prompt format {fmt.split(': ', 1)[1]}" in stage_log
        losses = [float(x.split()[0]) for x in stage_log.split(" loss: ")[1:]]
        assert losses and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_export_carries_the_format_to_chat(tmp_path, arch):
    """An exported folder remembers its prompt format: ``slidechat chat``'s session prompts as trained."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slidechat.apps.chat import ChatSession
    from slidechat.model.slidechat_model import SlideChatConfig, SlideChatModel
    from slidechat.model.tiny_llm import make_tiny_llm

    llm_dir = make_tiny_llm(tmp_path / arch, **FAMILIES[arch][0])
    tok = AutoTokenizer.from_pretrained(llm_dir)
    cfg = SlideChatConfig(encoder=dict(embed_dim=512, ffn_dim=64, num_heads=8, num_layers=1,
                                       segment_lengths=[16, 32], dilated_ratios=[1, 2]),
                          prompt_template=CHAT_TEMPLATE)
    SlideChatModel(AutoModelForCausalLM.from_pretrained(llm_dir), cfg, tokenizer=tok).save_pretrained(
        tmp_path / "export")
    model = SlideChatModel.from_pretrained(tmp_path / "export")
    assert model.config.prompt_template == CHAT_TEMPLATE
    session = ChatSession(model, model.tokenizer, np.zeros((4, 512), np.float32), max_new_tokens=4)
    session.history.append(("What is seen?", "\nCarcinoma."))
    ids = session.prompt_ids("Which grade?")
    ref = reference_ids(tok, reference_messages([{"from": "human", "value": "What is seen?"},
                                                 {"from": "gpt", "value": "\nCarcinoma."},
                                                 {"from": "human", "value": "Which grade?"}], ""),
                        add_generation_prompt=True)
    assert with_placeholder_text(tok, ids) == ref
    assert len(session.ask("Is there necrosis?")) >= 0 and len(session.history) == 2


def _flat(d: Any, pre: str = "") -> Dict[str, str]:
    if isinstance(d, dict):
        return {k: v for key, val in d.items() for k, v in _flat(val, f"{pre}{key}.").items()}
    if isinstance(d, (list, tuple)):
        return {k: v for i, val in enumerate(d) for k, v in _flat(val, f"{pre}{i}.").items()}
    return {pre[:-1]: repr(d)}


@pytest.mark.parametrize("stage", ["1", "2"])
def test_qwen3_8b_configs_differ_from_qwen25_only_in_llm_and_format(stage):
    from mmengine.config import Config

    base = Config.fromfile(str(REPO / f"configs/slidechat/stage_{stage}.py"))
    q3 = Config.fromfile(str(REPO / f"configs/slidechat/stage_{stage}_qwen3_8b.py"))
    assert base.prompt_template == base.model.slidechat_config.prompt_template == "qwen_chat"
    assert base.train_dataloader.dataset.template == "qwen_chat"
    assert q3.prompt_template == q3.model.slidechat_config.prompt_template == CHAT_TEMPLATE
    assert q3.train_dataloader.dataset.template == CHAT_TEMPLATE
    assert dict(q3.model.slidechat_config.chat_template_kwargs) == {"enable_thinking": False}
    for node in (q3.model.llm, q3.tokenizer, q3.train_dataloader.dataset.tokenizer):
        assert node.pretrained_model_name_or_path == q3.llm_name_or_path == "Qwen/Qwen3-8B"
    a, b = _flat(base._cfg_dict.to_dict()), _flat(q3._cfg_dict.to_dict())
    differ = {k.split(".")[0] if k.split(".")[0] in ("llm_name_or_path", "prompt_template", "read_base",
                                                     "chat_template_kwargs", "pretrained_pth") else k
              for k in set(a) | set(b) if a.get(k) != b.get(k)}
    allowed = {"llm_name_or_path", "prompt_template", "chat_template_kwargs", "read_base",
               "model.llm.pretrained_model_name_or_path", "tokenizer.pretrained_model_name_or_path",
               "train_dataloader.dataset.tokenizer.pretrained_model_name_or_path",
               "model.slidechat_config.prompt_template", "model.slidechat_config.chat_template_kwargs.enable_thinking",
               "train_dataloader.dataset.template", "train_dataloader.dataset.chat_template_kwargs.enable_thinking"}
    if stage == "2":  # the Qwen3 stage-1 result: a Qwen2.5 projector has the wrong output width
        allowed |= {"pretrained_pth", "model.pretrained_pth"}
        assert q3.model.pretrained_pth == q3.pretrained_pth == "work_dirs/stage1_qwen3_8b"
    assert differ <= allowed, sorted(differ - allowed)

"""Hostile model folders (issue 16): one rule for every entry point (:mod:`slidechat.model.hf_folder`).

- A folder that asks to run its own Python code (``auto_map``) is refused with one line naming
  ``--trust-remote-code`` -- never run, and never asked about on stdin (transformers' prompt would eat the
  first chat line as its answer).
- A folder whose weights file holds none of the model's weights is refused with one line and exit 1
  (transformers would fill the model with random weights and only log a warning); ``--allow-partial``
  loads it with a warning; a correct folder, tied weights included, loads without complaint.

Commands run in a subprocess with a scripted stdin, as a user would run them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_testing import CONFIG, build_tiny_setup  # noqa: E402
from train_data import one_image_dataset  # noqa: E402

PROMPT_TEXT = "Do you wish to run the custom code"
STDIN = "y\nWhat is this?\nexit\n"  # "y" would be the answer to transformers' trust prompt


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")


def _cli(args: List[str], stdin: str = STDIN, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slidechat.cli.main", *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=dict(_env(), **env), timeout=600)


def _assert_refused(res: subprocess.CompletedProcess, folder: Path, *words: str) -> str:
    """Exit 1, no traceback, no trust prompt, and the error on one line naming the folder."""
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert PROMPT_TEXT not in out
    lines = [ln for ln in res.stderr.splitlines() if str(folder) in ln]
    assert len(lines) == 1, res.stderr[-3000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _evil_code(folder: Path, marker: Path) -> None:
    """A python file that, if it ever ran, would leave ``marker`` behind."""
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('code ran')\n"
        "class EvilConfig: pass\nclass EvilModel: pass\nclass EvilProc: pass\n", encoding="utf-8")


def _empty_weights(weights: Path) -> None:
    """Replace a weights file by one that holds a single tensor unrelated to the model."""
    import torch
    from safetensors.torch import save_file

    assert weights.is_file()
    for idx in weights.parent.glob("*.index.json"):
        idx.unlink()
    save_file({"unrelated.tensor": torch.zeros(3)}, str(weights), metadata={"format": "pt"})


def _old_style_config(tmp_path: Path) -> Path:
    """The tiny stage-2 config as configs were written before hf_folder (transformers' Auto classes,
    no trust_remote_code), in the stage-1 config it extends (where the LLM and tokenizer are written)."""
    text = (CONFIG.parent / "stage_1.py").read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines() if ln.startswith("from slidechat.model.hf_folder import"))
    text = text.replace(line, "from transformers import AutoModelForCausalLM, AutoTokenizer")
    for checked, auto in (("CheckedCausalLM", "AutoModelForCausalLM"), ("CheckedTokenizer", "AutoTokenizer")):
        text = text.replace(f"{checked}.from_pretrained, trust_remote_code=False,", f"{auto}.from_pretrained,")
    assert "Checked" not in text and "trust_remote_code" not in text
    out = tmp_path / "old_style"
    out.mkdir(exist_ok=True)
    (out / "stage_1.py").write_text(text, encoding="utf-8")
    shutil.copyfile(CONFIG, out / CONFIG.name)
    return out / CONFIG.name


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> dict:
    return build_tiny_setup(tmp_path_factory.getbasetemp() / "slidechat_testing_setup")


@pytest.fixture(scope="module")
def vl(tmp_path_factory) -> Dict[str, Path]:
    """A tiny Qwen2-VL folder, a one-row LLaMA-Factory dataset, one field image and one cytology slide."""
    from slidechat.data import synthetic_cytology as sc
    from slidechat.model.tiny_qwen2vl import make_tiny_qwen2vl

    root = tmp_path_factory.mktemp("hostile_vl")
    model = make_tiny_qwen2vl(root / "good", seed=0)
    data = root / "data"
    one_image_dataset(data, "rows", "What is seen?", "Cells.", "field.png")
    sc.write_cytology_slides(root / "slides", n_slides=1, seed=3, width=512, height=512, base_mpp=0.5,
                             field_size=256, field_mpp=1.0, n_abnormal=4)
    slides = sorted((root / "slides").rglob("*.svs"))
    assert slides
    return {"root": root, "model": Path(model), "data": data, "image": data / "imgs" / "field.png",
            "slide": slides[0]}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _infer(vl: dict, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return _cli(["infer", "--model_name_or_path", model, "--dataset", "rows", "--dataset_dir", vl["data"],
                 "--save_name", out, "--temperature", "0", "--max_new_tokens", "2", "--no_progress",
                 "--device", "cpu", *extra])


def _chat_image(vl: dict, model: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    return _cli(["chat", "--image", vl["image"], "--model_name_or_path", model, "--device", "cpu",
                 "--max-new-tokens", "2", "--jsonl", *extra], **env)


def _screen(vl: dict, model: Path, out: Path) -> subprocess.CompletedProcess:
    return _cli(["screen", vl["slide"], "--model_name_or_path", model, "--out", out, "--field-size", "256",
                 "--mpp", "1.0", "--device", "cpu", "--no-progress", "--n-boot", "10"])


# ------------------------------------------------------------------------------------ (a) remote code
def test_chat_refuses_exported_folder_whose_llm_asks_for_remote_code(slide, tmp_path) -> None:
    folder = _copy(slide["exported"], tmp_path / "exported_evil")
    marker = tmp_path / "MARKER"
    cfg_path = folder / "llm" / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update(model_type="evil_llm",
               auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    _evil_code(folder / "llm", marker)
    feats = slide["feats"] / "BRCA" / "TCGA-00.h5"
    res = _cli(["chat", "--checkpoint", folder, "--features", feats, "--max-new-tokens", "2", "--jsonl"])
    _assert_refused(res, folder / "llm", "--trust-remote-code", "own Python code")
    assert not marker.exists()
    assert res.stdout == ""  # the user's lines were not answered, nor taken as a yes


def test_qwen2vl_folder_asking_for_remote_code_is_refused_by_infer_and_chat(vl, tmp_path) -> None:
    folder = _copy(vl["model"], tmp_path / "vl_evil")
    marker = tmp_path / "MARKER"
    (folder / "processor_config.json").write_text(json.dumps(
        {"processor_class": "EvilProc", "auto_map": {"AutoProcessor": "evil.EvilProc"}}), encoding="utf-8")
    _evil_code(folder, marker)
    for res in (_infer(vl, folder, tmp_path / "pred.jsonl"), _chat_image(vl, folder)):
        _assert_refused(res, folder, "--trust-remote-code")
        assert not marker.exists()
        assert res.stdout == ""
    # the user's flag is the one way in (the fake processor then fails to load: still one line)
    res = _chat_image(vl, folder, "--trust-remote-code", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    assert marker.exists()
    assert "Traceback" not in res.stderr and PROMPT_TEXT not in res.stderr + res.stdout


def test_every_model_loading_command_has_the_flag_off_by_default() -> None:
    from slidechat.cli.main import build_parser

    parser = build_parser()
    commands = {"chat": ["chat", "--features", "f.h5"], "infer": ["infer", "--model_name_or_path", "m"],
                "screen": ["screen", "s.svs"], "test": ["test", "c.py", "--checkpoint", "k",
                                                        "--test_slide_csv", "a", "--test_output_csv", "b"],
                "export": ["export", "c.py", "--out", "o"]}
    for name, argv in commands.items():
        assert parser.parse_args(argv).trust_remote_code is False, name
        assert parser.parse_args(argv + ["--trust-remote-code"]).trust_remote_code is True, name


def test_trust_remote_code_is_explicit_in_every_config_loader() -> None:
    """The shipped configs name the checked loaders with trust_remote_code=False; a config that still
    names the transformers classes is rewritten the same way, and only the user's flag turns it on."""
    from mmengine.config import Config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slidechat.model.hf_folder import CheckedCausalLM, CheckedTokenizer, harden_config

    repo = Path(__file__).resolve().parents[1]
    for name in ("tiny/stage_1.py", "tiny/stage_2.py", "slidechat/stage_1.py", "slidechat/stage_2.py"):
        cfg = Config.fromfile(str(repo / "configs" / name))
        for node in (cfg.model.llm, cfg.tokenizer):
            assert node["trust_remote_code"] is False, name
        assert cfg.model.llm.type == CheckedCausalLM.from_pretrained, name
        assert cfg.tokenizer.type == CheckedTokenizer.from_pretrained, name
    old = {"tokenizer": {"type": AutoTokenizer.from_pretrained, "pretrained_model_name_or_path": "x"},
           "model": {"llm": {"type": AutoModelForCausalLM.from_pretrained,
                             "pretrained_model_name_or_path": "x"},
                     "other": [{"type": AutoTokenizer.from_pretrained, "trust_remote_code": None}]}}
    assert harden_config(old) == 3
    assert old["model"]["llm"]["type"] == CheckedCausalLM.from_pretrained
    assert old["tokenizer"]["type"] == CheckedTokenizer.from_pretrained
    assert [old["tokenizer"]["trust_remote_code"], old["model"]["llm"]["trust_remote_code"],
            old["model"]["other"][0]["trust_remote_code"]] == [False, False, False]
    harden_config(old, trust_remote_code=True)
    assert old["model"]["llm"]["trust_remote_code"] is True


def test_old_style_config_is_hardened_and_still_dumps(tmp_path) -> None:
    """slidechat's config loader puts a config naming transformers' classes under the same rules, in the
    form mmengine's lazy-import mode can still write out (the Runner dumps every config it runs)."""
    from slidechat.engine.builder import load_config
    from slidechat.model.hf_folder import CheckedCausalLM, CheckedTokenizer

    cfg = load_config(_old_style_config(tmp_path))
    assert cfg.model.llm.type == CheckedCausalLM.from_pretrained
    assert cfg.tokenizer.type == CheckedTokenizer.from_pretrained
    assert cfg.model.llm.trust_remote_code is False and cfg.tokenizer.trust_remote_code is False
    assert "hf_folder.CheckedCausalLM.from_pretrained" in cfg.pretty_text
    trusted = load_config(_old_style_config(tmp_path), trust_remote_code=True)
    assert trusted.model.llm.trust_remote_code is True


# ---------------------------------------------------------------------------- (b) Qwen2-VL, no weights
def test_qwen2vl_folder_without_weights_is_refused_everywhere(vl, tmp_path) -> None:
    folder = _copy(vl["model"], tmp_path / "vl_empty")
    _empty_weights(folder / "model.safetensors")
    for res in (_infer(vl, folder, tmp_path / "pred.jsonl"), _chat_image(vl, folder),
                _screen(vl, folder, tmp_path / "screen")):
        line = _assert_refused(res, folder, "would stay random", "--allow-partial")
        assert "unrelated.tensor" in line  # and the weights it holds instead
    assert not (tmp_path / "pred.jsonl").exists() or (tmp_path / "pred.jsonl").read_text() == ""
    assert not list((tmp_path / "screen").glob("fields/*.csv"))


def test_qwen2vl_good_folder_still_works_and_partial_is_an_opt_in(vl, tmp_path, caplog) -> None:
    from slidechat.model.qwen2vl import load_qwen2vl
    from slidechat.utils.errors import SlideChatError

    with caplog.at_level("WARNING"):  # the good folder (tests/test_infer.py runs it through every command)
        model, processor = load_qwen2vl(vl["model"])
    assert model is not None and processor is not None and "hf_folder" not in caplog.text
    caplog.clear()
    folder = _copy(vl["model"], tmp_path / "vl_empty")
    _empty_weights(folder / "model.safetensors")
    with pytest.raises(SlideChatError, match="would stay random"):
        load_qwen2vl(folder)
    with caplog.at_level("WARNING", logger="slidechat.model.hf_folder"):
        model, _ = load_qwen2vl(folder, allow_partial=True)
    assert model is not None and "loaded anyway" in caplog.text


# ------------------------------------------------------------------------ (c) exported slide folder
def test_exported_slide_folder_without_llm_weights_is_refused(slide, tmp_path) -> None:
    from slidechat.apps.chat import load_chat_model
    from slidechat.utils.errors import SlideChatError

    folder = _copy(slide["exported"], tmp_path / "exported_empty")
    _empty_weights(folder / "llm" / "model.safetensors")
    feats = slide["feats"] / "BRCA" / "TCGA-00.h5"
    res = _cli(["chat", "--checkpoint", folder, "--features", feats, "--max-new-tokens", "2", "--jsonl"])
    _assert_refused(res, folder / "llm", "would stay random")
    assert res.stdout == ""
    # through a config too (slidechat test / export / chat --config build the LLM from the config)
    with pytest.raises(SlideChatError, match="would stay random"):
        load_chat_model(folder, CONFIG)
    with pytest.raises(SlideChatError, match="would stay random"):  # a config naming transformers' classes
        load_chat_model(folder, _old_style_config(tmp_path))
    model, _ = load_chat_model(folder, allow_partial=True)  # the opt-in: loads, with a warning
    assert model is not None


# ------------------------------------------------------------------------------------- tied weights
def test_tied_weights_load_without_complaint_and_missing_embeddings_do_not(slide, tmp_path) -> None:
    """tie_word_embeddings: lm_head is not in the file, yet nothing is missing; without the embedding
    matrix both it and lm_head would be random, which is refused."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from slidechat.model.hf_folder import CheckedCausalLM
    from slidechat.utils.errors import SlideChatError

    cfg = AutoConfig.from_pretrained(slide["llm"])
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "tied")
    sd = load_file(str(tmp_path / "tied" / "model.safetensors"))
    assert "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd
    model = CheckedCausalLM.from_pretrained(tmp_path / "tied")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.embed_tokens.weight, sd["model.embed_tokens.weight"])
    del sd["model.embed_tokens.weight"]
    save_file(sd, str(tmp_path / "tied" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SlideChatError, match="embed_tokens"):
        CheckedCausalLM.from_pretrained(tmp_path / "tied")

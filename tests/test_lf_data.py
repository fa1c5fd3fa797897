"""LLaMA-Factory dataset rules (issue 18, "Exact to LLaMA-Factory" items 2, 3, 5, 6).

Every expectation below is written by hand from LLaMA-Factory's own code at the commit CytoChat pins
(hiyouga/LLaMA-Factory 5afa851): ``src/llamafactory/data/converter.py`` (Alpaca/Sharegpt/OpenAI
converters, ``_find_medias``), ``parser.py`` (``DatasetAttr.join``), ``loader.py``
(``_load_single_dataset``, ``_get_merged_dataset``), ``processor/supervised.py`` and
``processor/unsupervised.py`` (``preprocess_dataset``), ``template.py`` (``Template._encode``,
the ``qwen2_vl`` template) and ``tool_utils.py`` (``QWEN_TOOL_PROMPT``, ``QwenToolUtils``), never from
our reader's output.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slidechat.data.llamafactory import read_llamafactory
from slidechat.utils.errors import SlideChatError

SYS = "You are a helpful assistant."  # template.py: qwen2_vl default_system
ROLE_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
STAIN = {"type": "function", "function": {"name": "stain", "description": "Pap stain a slide",
                                          "parameters": {"type": "object", "properties": {}}}}


def tools_text(funcs):
    """tool_utils.py QWEN_TOOL_PROMPT with QwenToolUtils.tool_formatter (5afa851): one "\\n" + JSON line
    per function, wrapped as {"type": "function", "function": f} unless f already has type "function"."""
    lines = ""
    for f in funcs:
        lines += "\n" + json.dumps(f if f.get("type") == "function" else {"type": "function", "function": f},
                                   ensure_ascii=False)
    return ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>" + lines +
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _img(path: Path, size=(56, 56)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _write(path: Path, rows, jsonl: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows)
    path.write_text(text, encoding="utf-8")
    return path


def _info(d: Path, **entries) -> None:
    (d / "dataset_info.json").write_text(json.dumps(entries))


def _turns(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# ------------------------------------------------------------------------------------------ 6. alpaca
def test_alpaca_rows_with_history_system_and_images(tmp_path):
    d = tmp_path / "data"
    _img(d / "fov" / "a.png")
    rows = [
        {"instruction": "<image>Grade this field.", "input": "Cervical smear.", "output": "LSIL.",
         "system": "You are a cytopathologist.",
         "history": [["Is the stain adequate?", "Yes."], ["Any artefacts?", "\nNone."]],
         "images": ["fov/a.png"]},
        {"instruction": "Name one Bethesda category.", "input": "", "output": ""},  # empty input, empty answer
        {"instruction": "What is TBS?", "input": "", "output": None},  # no answer
    ]
    _write(d / "alp.json", rows, jsonl=False)
    # parser.py: formatting defaults to "alpaca"; columns given -> unlisted ones are None
    _info(d, alp={"file_name": "alp.json", "columns": {"prompt": "instruction", "query": "input",
                                                        "response": "output", "system": "system",
                                                        "history": "history", "images": "images"}})
    ex = read_llamafactory("alp", d, lf_rules=True)
    # AlpacaDatasetConverter: history pairs -> user/assistant; "instruction\ninput"; output -> assistant
    assert ex[0].messages == _turns(("user", "Is the stain adequate?"), ("assistant", "Yes."),
                                    ("user", "Any artefacts?"), ("assistant", "\nNone."),
                                    ("user", "<image>Grade this field.\nCervical smear."), ("assistant", "LSIL."))
    assert ex[0].system == "You are a cytopathologist." and ex[0].images == [d / "fov" / "a.png"]
    # an empty input is left out of the join; an empty output is still a string -> kept as the answer
    assert ex[1].messages == _turns(("user", "Name one Bethesda category."), ("assistant", ""))
    assert ex[1].system is None
    # supervised.py drops a row whose _response is not one message (output not a string)
    assert len(ex) == 2 and ex.counts == {"no answer": 1} and ex.kept_empty_answers == 1
    # unsupervised.py (vllm_infer) keeps it, unlabelled
    pred = read_llamafactory("alp", d, lf_rules=True, predict=True)
    assert len(pred) == 3 and pred[2].label is None
    assert pred[2].messages == _turns(("user", "What is TBS?"))
    # LLaMA-Factory's defaults when no "columns": instruction/input/output, no system, no history
    _info(d, alp={"file_name": "alp.json"})
    ex = read_llamafactory("alp", d, lf_rules=True, skip_bad=True)
    assert ex.counts == {"bad row": 1, "no answer": 1}  # row 0: an <image> but no images column
    assert ex[0].messages == _turns(("user", "Name one Bethesda category."), ("assistant", ""))


# ------------------------------------------------------------------------------------------ 6. openai
def test_openai_rows_system_message_and_sharegpt_openai_spelling(tmp_path):
    d = tmp_path / "data"
    rows = [{"messages": _turns(("system", "Be brief."), ("user", "Q1"), ("assistant", "A1"))},
            {"messages": _turns(("user", "Q2"), ("assistant", "A2"))},
            {"messages": _turns(("system", "detailed thinking on"), ("user", "Q3"), ("assistant", "A3"))},
            {"messages": _turns(("system", "Be brief."), ("user", "Q4"), ("assistant", "A4")),
             "tools": [WEATHER]}]
    _write(d / "oa.jsonl", rows)
    tags = dict(ROLE_TAGS, system_tag="system")
    _info(d, oa={"file_name": "oa.jsonl", "formatting": "openai",
                 "columns": {"messages": "messages", "tools": "tools"}, "tags": tags},
          docs={"file_name": "oa.jsonl", "formatting": "sharegpt",
                "columns": {"messages": "messages"}, "tags": tags})
    ex = read_llamafactory("oa", d)
    # OpenAIDatasetConverter: leading system message -> system; no tools -> "\ndetailed thinking off"
    # appended; no system and no tools -> "detailed thinking off"; already saying it -> unchanged;
    # tools (a list, dumped to JSON) -> system + "\n"
    assert [e.system for e in ex] == ["Be brief.\ndetailed thinking off", "detailed thinking off",
                                      "detailed thinking on", "Be brief.\n"]
    assert ex[0].messages == _turns(("user", "Q1"), ("assistant", "A1"))
    assert json.loads(ex[3].tools) == [WEATHER]
    assert ex[3].system_prompt() == "Be brief.\n" + tools_text([WEATHER])  # Template._encode
    # data/README.md "OpenAI format": sharegpt formatting with role/content tags and system_tag
    docs = read_llamafactory("docs", d)
    assert [e.system for e in docs] == ["Be brief.", None, "detailed thinking on", "Be brief."]
    assert docs[3].tools is None  # columns given without tools -> DatasetAttr.tools is None


# --------------------------------------------------------------------------------------- 6. media_dir
def test_media_dir_resolution(tmp_path, monkeypatch, caplog):
    d, media = tmp_path / "data", tmp_path / "media"
    _img(media / "fov" / "m.png")
    _img(d / "fov" / "d.png")
    _img(tmp_path / "cwd" / "fov" / "c.png")
    row = {"messages": _turns(("user", "<image>q"), ("assistant", "a")), "images": ["fov/m.png"]}
    _write(d / "m.jsonl", [row, dict(row, images=["fov/d.png"]), dict(row, images=["fov/c.png"])])
    _info(d, m={"file_name": "m.jsonl", "formatting": "sharegpt",
                "columns": {"messages": "messages", "images": "images"}, "tags": ROLE_TAGS})
    monkeypatch.chdir(tmp_path / "cwd")
    # converter.py _find_medias: os.path.join(media_dir, path) when that file exists, else the path as
    # written (relative to the working directory) with a warning; data_args: media_dir defaults to dataset_dir
    caplog.set_level(logging.WARNING)
    ex = read_llamafactory("m", d, media_dir=media, check_images=False)
    assert ex[0].images == [media / "fov" / "m.png"]
    assert ex[2].images == [(tmp_path / "cwd" / "fov" / "c.png").resolve()]
    assert "fov/c.png" in caplog.text
    ex = read_llamafactory("m", d, check_images=False)  # default: dataset_dir
    assert ex[1].images == [d / "fov" / "d.png"]
    with pytest.raises(SlideChatError, match=r"m\.jsonl: row 0: image 0 \(fov/m\.png\)"):
        read_llamafactory("m", d)  # not under the dataset dir, nor the working directory


# ----------------------------------------------------------------------------------- 6. folder datasets
def test_folder_dataset_order_and_max_samples(tmp_path):
    d = tmp_path / "data"
    folder = d / "parts"
    for name, n in (("z.jsonl", 2), ("a.json", 3), ("m.jsonl", 1)):
        rows = [{"messages": _turns(("user", f"{name} q{i}"), ("assistant", f"{name} a{i}"))} for i in range(n)]
        _write(folder / name, rows, jsonl=name.endswith(".jsonl"))
    _info(d, parts={"file_name": "parts", "formatting": "sharegpt", "columns": {"messages": "messages"},
                    "tags": ROLE_TAGS})
    # loader.py: data_files = os.listdir order, loaded as one dataset; max_samples keeps its first rows
    order = os.listdir(folder)
    every = [f"{n} a{i}" for n in order for i in range({"z.jsonl": 2, "a.json": 3, "m.jsonl": 1}[n])]
    assert [e.label for e in read_llamafactory("parts", d)] == every
    assert [e.label for e in read_llamafactory("parts", d, max_samples=4)] == every[:4]
    # each dataset of a comma list gets its own max_samples (_load_single_dataset), then concatenation
    _write(d / "one.jsonl", [{"messages": _turns(("user", f"q{i}"), ("assistant", f"o{i}"))} for i in range(3)])
    info = json.loads((d / "dataset_info.json").read_text())
    info["one"] = dict(info["parts"], file_name="one.jsonl")
    (d / "dataset_info.json").write_text(json.dumps(info))
    assert [e.label for e in read_llamafactory("parts,one", d, max_samples=2)] == every[:2] + ["o0", "o1"]
    # "File types should be identical": a hidden file (no JSON extension) makes LLaMA-Factory refuse it
    (folder / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(SlideChatError, match=r"\.DS_Store"):
        read_llamafactory("parts", d)


# -------------------------------------------------------------------------------------------- 2. tools
def test_tools_column_joins_the_system_prompt(tmp_path):
    from slidechat.data.template import render_qwen2vl_prompt
    from slidechat.inference.loop import cytology_items

    d = tmp_path / "data"
    rows = [{"conversations": [{"from": "human", "value": "Weather?"}, {"from": "gpt", "value": "Sunny."}],
             "tools": json.dumps([WEATHER, STAIN])},
            {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Q"},
                               {"from": "gpt", "value": "A"}], "tools": "[]"},
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "tools": ""}]
    _write(d / "tools.json", rows, jsonl=False)
    # glaive_toolcall_en_demo's entry: sharegpt, conversations + tools columns, default tags
    _info(d, t={"file_name": "tools.json", "formatting": "sharegpt",
                "columns": {"messages": "conversations", "tools": "tools"}})
    ex = read_llamafactory("t", d)
    # Template._encode: system = system or default_system; then system + format_tools(tools) when tools
    assert ex[0].system_prompt() == SYS + tools_text([WEATHER, STAIN])
    assert ex[0].system_prompt("Custom.") == "Custom." + tools_text([WEATHER, STAIN])
    assert ex[1].system_prompt() == "Be brief."  # "[]" -> ToolFormatter gives "" -> system unchanged
    assert ex[2].system_prompt() is None  # no tools: the template's default applies later
    prompt = render_qwen2vl_prompt(ex[0].prompt_messages, system=ex[0].system_prompt())
    assert prompt == (f"<|im_start|>system\n{SYS}{tools_text([WEATHER, STAIN])}<|im_end|>\n"
                      "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n")
    assert cytology_items(ex[:1])[0].system == SYS + tools_text([WEATHER, STAIN])
    # ToolFormatter raises on a description that is not JSON: one line naming file, row and column
    rows[2]["tools"] = "get_weather(city)"
    _write(d / "tools.json", rows, jsonl=False)
    with pytest.raises(SlideChatError, match=r"tools\.json: row 2: 'tools' \(tools\) is not valid JSON"):
        read_llamafactory("t", d)


def test_slide_model_refuses_a_tools_column(tmp_path):
    from slidechat.data.dataset import SlideInstructionDataset

    d = tmp_path / "data"
    (d / "feat").mkdir(parents=True)
    np.savetxt(d / "feat" / "s.csv", np.zeros((2, 4)), delimiter=",")
    _write(d / "s.jsonl", [{"messages": _turns(("user", "<image>Q"), ("assistant", "A")),
                            "images": ["feat/s.csv"], "tools": json.dumps([WEATHER])}])
    with pytest.raises(SlideChatError, match=r"s\.jsonl: row 0.*'tools' column is not supported"):
        SlideInstructionDataset(str(d / "s.jsonl"), _ByteTok(), dataset_dir=d, check_files=False)


class _ByteTok:
    """Just enough tokenizer for SlideInstructionDataset to be built (it refuses the row first)."""

    eos_token_id = pad_token_id = 0
    bos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return list(text.encode())


# -------------------------------------------------------------------------------------- 3. KTO / ranking
def test_kto_and_ranking_datasets_are_refused(tmp_path):
    d = tmp_path / "data"
    _write(d / "kto.json", [{"messages": _turns(("user", "Q"), ("assistant", "A")), "label": False}], jsonl=False)
    _info(d, kto_en_demo={"file_name": "kto.json", "formatting": "sharegpt",
                          "columns": {"messages": "messages", "kto_tag": "label"}, "tags": ROLE_TAGS},
          dpo={"file_name": "kto.json", "formatting": "sharegpt", "ranking": True,
               "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"}, "tags": ROLE_TAGS})
    # converter.py: a bool kto_tag gives two responses; supervised.py drops every such row (SFT)
    with pytest.raises(SlideChatError, match=r"dataset 'kto_en_demo': a KTO dataset \(columns\.kto_tag 'label'\)"):
        read_llamafactory("kto_en_demo", d, skip_bad=True, lf_rules=True)
    # loader.py _get_merged_dataset: ranking outside stage rm -> "not applicable in the current training stage"
    with pytest.raises(SlideChatError, match=r"dataset 'dpo': a ranking \(preference\) dataset"):
        read_llamafactory("dpo", d, skip_bad=True, lf_rules=True)


# ----------------------------------------------------------------------------------- 5. row dropping
def _mixed_rows():
    """Rows and what LLaMA-Factory does with each (SharegptDatasetConverter + processors)."""
    return [
        {"id": "good", "messages": _turns(("user", "Q0"), ("assistant", "A0"))},  # kept
        {"id": "user-last", "messages": _turns(("user", "Q1"), ("assistant", "A1"), ("user", "Q1b"))},  # count
        {"id": "sys", "messages": _turns(("system", "S"), ("user", "Q2"), ("assistant", "A2"))},  # role tag
        {"id": "empty", "messages": _turns(("user", "Q3"), ("assistant", ""))},  # kept, empty label
        {"id": "none", "messages": []},  # converter keeps [], the processors drop an empty prompt
        {"id": "order", "messages": _turns(("user", "Q5"), ("user", "Q5b"))},  # role tag
    ]


def test_row_rules_follow_llamafactory_with_lf_rules(tmp_path):
    d = tmp_path / "data"
    _write(d / "mix.jsonl", _mixed_rows())
    # mllm_demo-style tags: no system_tag -> DatasetAttr.system_tag is None (join resets unlisted tags)
    _info(d, mix={"file_name": "mix.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                  "tags": ROLE_TAGS})
    with pytest.raises(SlideChatError, match=r"mix\.jsonl: row 1 \(id user-last\): .*--skip_bad"):
        read_llamafactory("mix", d)
    ex = read_llamafactory("mix", d, lf_rules=True)
    assert [e.id for e in ex] == ["good", "empty"] and ex[1].label == ""
    assert ex.counts == {"ending with a user turn": 1, "system message without system_tag": 1,
                         "no messages": 1, "role out of order": 1}
    assert ex.kept_empty_answers == 1 and ex.num_skipped == 4
    assert ex.summary() == ("dropped 4 of 6 rows (1 ending with a user turn, 1 system message without "
                            "system_tag, 1 no messages, 1 role out of order); kept 2 (1 with an empty answer)")
    # the same system message with system_tag set is the system prompt
    _info(d, mix={"file_name": "mix.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                  "tags": dict(ROLE_TAGS, system_tag="system")})
    ex = read_llamafactory("mix", d, lf_rules=True)
    assert [e.id for e in ex] == ["good", "sys", "empty"] and ex[1].system == "S"


# ----------------------------------------------------------------------- 5. --skip_bad in slidechat infer
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from slidechat.model.tiny_qwen2vl import make_tiny_qwen2vl

    return make_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl") / "model")


def test_infer_skip_bad_counts_and_tools_prompt(tiny, tmp_path, caplog):
    import torch

    from slidechat.cli.main import main

    d = tmp_path / "data"
    _img(d / "imgs" / "f.png")
    rows = _mixed_rows()
    rows[0]["messages"][0]["content"] = "<image>Q0"
    rows[0]["images"] = ["imgs/f.png"]
    rows.append({"id": "tools", "messages": _turns(("user", "Weather?"), ("assistant", "Sunny.")),
                 "tools": json.dumps([WEATHER])})
    _write(d / "mix.jsonl", rows)
    _info(d, mix={"file_name": "mix.jsonl", "formatting": "sharegpt",
                  "columns": {"messages": "messages", "images": "images", "tools": "tools"}, "tags": ROLE_TAGS})
    out = tmp_path / "pred.jsonl"
    args = ["infer", "--model_name_or_path", str(tiny), "--dataset", "mix", "--dataset_dir", str(d),
            "--save_name", str(out), "--temperature", "0", "--max_new_tokens", "2", "--no_progress"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        caplog.set_level(logging.INFO)
        assert main(args) == 1  # without the flag: one line naming file and row, and that --skip_bad exists
        assert "mix.jsonl: row 1 (id user-last)" in caplog.text and "--skip_bad" in caplog.text
        assert not out.exists()
        caplog.clear()
        assert main(args + ["--skip_bad"]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = [r.getMessage() for r in caplog.records if "dropped 4 of 7 rows" in r.getMessage()]
    assert summary == ["mix: dropped 4 of 7 rows (1 ending with a user turn, 1 system message without "
                       "system_tag, 1 no messages, 1 role out of order); kept 3 (1 with an empty answer)"]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"]["id"] for x in lines] == ["good", "empty", "tools"]
    assert lines[1]["label"] == "\n"  # vllm_infer: "" + <|im_end|>\n decoded without special tokens
    # the tools row's prompt: the default system plus the qwen tool text (vllm_infer decodes the prompt)
    assert lines[2]["prompt"] == f"system\n{SYS}{tools_text([WEATHER])}\nuser\nWeather?\nassistant\n"

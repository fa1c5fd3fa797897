"""``slidechat infer`` / ``chat --image`` on a tiny random Qwen2-VL, and the shared inference loop.

Expectations are written from LLaMA-Factory's ``scripts/vllm_infer.py`` (prompt and label decoded with
special tokens skipped; label = the final assistant turn as the ``qwen2_vl`` template writes it, i.e.
``{content}<|im_end|>\\n`` -> ``content + "\\n"``) and from CytoChat's benchmark files, whose prompts read
``system\\nYou are a helpful assistant.\\nuser\\n{question}\\nassistant\\n``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest

BIN = Path(sys.executable).parent
DEFAULT_SYSTEM = "You are a helpful assistant."
MAX_NEW = 64  # long enough for the kill test to catch the run in the middle
N_ROWS = 10
BAD_ROW, MISSING_ROW, MULTI_ROW, SYSTEM_ROW, TWO_IMAGE_ROW = 3, 6, 4, 8, 9


def _rows(img_dir: Path) -> List[dict]:
    """Rows in LLaMA-Factory sharegpt form (role/content tags), with an id column."""
    rng = np.random.default_rng(0)
    from PIL import Image

    sizes = [(56, 56), (84, 56), (112, 84), (56, 112), (70, 70), (98, 56), (56, 84), (84, 84),
             (64, 48), (48, 64)]
    rows = []
    for i in range(N_ROWS):
        name = f"field_{i}.png"
        if i == BAD_ROW:
            (img_dir / name).write_bytes(b"this is not a PNG")
        elif i != MISSING_ROW:
            w, h = sizes[i]
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img_dir / name)
        q = f"Locate all dark {i}."
        a = f"dark 1 is located at <region>{i} 2.5 30 {40 + i}</region>."
        msgs = [{"role": "user", "content": f"<image>{q}"}, {"role": "assistant", "content": a}]
        if i == MULTI_ROW:
            msgs += [{"role": "user", "content": "Any other abnormal cells?"},
                     {"role": "assistant", "content": "No."}]
        row = {"id": f"case-{i:02d}", "messages": msgs, "images": [f"imgs/{name}"]}
        if i == TWO_IMAGE_ROW:  # two fields of view in one question
            msgs[0]["content"] = f"<image><image>{q}"
            row["images"].append("imgs/field_0.png")
        if i == SYSTEM_ROW:
            row["system"] = "You are a cytopathologist."
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def cyto(tmp_path_factory):
    """Tiny Qwen2-VL (built once, with the project's tool) + a small LLaMA-Factory dataset dir."""
    import torch

    root = tmp_path_factory.mktemp("infer")
    model_dir = root / "tiny_qwen2vl"
    res = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "tools" /
                                              "make_tiny_qwen2vl.py"), "--out", str(model_dir)],
                         capture_output=True, text=True, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-2000:]
    data = root / "data"
    (data / "imgs").mkdir(parents=True)
    rows = _rows(data / "imgs")
    with open(data / "cyto_test.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    info = {"cyto_test": {"file_name": "cyto_test.jsonl", "formatting": "sharegpt",
                          "columns": {"messages": "messages", "images": "images", "system": "system"},
                          "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                   "assistant_tag": "assistant"}}}
    (data / "dataset_info.json").write_text(json.dumps(info))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model: thread hand-offs cost more than the maths
    yield {"root": root, "model": model_dir, "data": data, "rows": rows}
    torch.set_num_threads(threads)


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")


def infer_args(cyto, out, *extra) -> list:
    return ["infer", "--model_name_or_path", str(cyto["model"]), "--dataset", "cyto_test",
            "--dataset_dir", str(cyto["data"]), "--template", "qwen2_vl", "--save_name", str(out),
            "--temperature", "0", "--max_new_tokens", str(MAX_NEW), "--no_progress", *extra]


def run_infer(cyto, out, *extra) -> int:
    from slidechat.cli.main import main

    return main(infer_args(cyto, out, *extra))


def read_lines(path) -> List[dict]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def reference(cyto):
    """An uninterrupted greedy run, batch 4."""
    out = cyto["root"] / "ref" / "predictions.jsonl"
    assert run_infer(cyto, out, "--batch_size", "4") == 0
    return out


def test_output_fields_exact(cyto, reference):
    lines = read_lines(reference)
    rows = cyto["rows"]
    assert len(lines) == N_ROWS
    for i, (line, row) in enumerate(zip(lines, rows)):
        keys = ["id", "images", "prompt", "predict", "label"] + (["error"] if i in (BAD_ROW, MISSING_ROW)
                                                               else [])
        assert list(line) == keys
        # id and images join back to the input row
        assert line["id"] == {"dataset": "cyto_test", "index": i, "id": row["id"]}
        assert [Path(p).resolve() for p in line["images"]] == [(cyto["data"] / p).resolve()
                                                                for p in row["images"]]
        msgs = row["messages"]
        system = row.get("system", DEFAULT_SYSTEM)
        q1 = msgs[0]["content"].replace("<image>", "")  # the vision spans are special tokens: skipped
        if i == MULTI_ROW:  # history included, final assistant turn is the label
            expected = (f"system\n{system}\nuser\n{q1}\nassistant\n{msgs[1]['content']}\n"
                        f"user\n{msgs[2]['content']}\nassistant\n")
        else:
            expected = f"system\n{system}\nuser\n{q1}\nassistant\n"
        assert line["prompt"] == expected
        assert line["label"] == msgs[-1]["content"] + "\n"
        if i in (BAD_ROW, MISSING_ROW):
            assert line["predict"] == ""
            assert f"field_{i}.png" in line["error"]
            assert ("not found" if i == MISSING_ROW else "cannot read image") in line["error"]
        else:
            assert isinstance(line["predict"], str) and line["predict"]
    # the tiny random model answers differently for different images/prompts
    assert len({x["predict"] for x in lines if "error" not in x}) > 1


def test_special_tokens_kept_when_asked(cyto, tmp_path):
    out = tmp_path / "p.jsonl"
    assert run_infer(cyto, out, "--max_samples", "1", "--max_new_tokens", "2",
                     "--skip_special_tokens", "false") == 0
    (line,) = read_lines(out)
    q = cyto["rows"][0]["messages"][0]["content"].replace("<image>", "")
    a = cyto["rows"][0]["messages"][1]["content"]
    assert line["prompt"] == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n"
                              f"<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n"
                              f"<|im_start|>assistant\n")
    assert line["label"] == f"{a}<|im_end|>\n"


def test_greedy_batch_1_equals_batch_4(cyto, reference, tmp_path):
    out = tmp_path / "b1.jsonl"
    assert run_infer(cyto, out, "--batch_size", "1") == 0
    # byte-equal although padding changes the kernels' shapes: greedy picks differ only when the top two logits
    # lie within float noise (~1e-6 of max|logit|); the closest pair in these rows' 512 steps is 2.4e-4 (measured)
    assert out.read_bytes() == reference.read_bytes()


def test_kill_9_and_resume_gives_each_row_once(cyto, reference, tmp_path):
    out = tmp_path / "killed.jsonl"
    cmd = [str(BIN / "slidechat"), *infer_args(cyto, out, "--batch_size", "1")]
    # tests/slow_appends makes each appended row wait 0.3 s, so the run is still going when the third
    # row is seen on any machine, however fast (without it a fast CPU can finish all rows between polls)
    env = dict(_env(), PYTHONPATH=os.pathsep.join([str(Path(__file__).parent / "slow_appends"),
                                                   os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "run ended before the kill: " + proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    n_before = out.read_bytes().count(b"\n")
    assert 3 <= n_before < N_ROWS
    with open(out, "ab") as f:  # a write torn by the kill: half a line, no newline
        f.write(b'{"id": {"dataset": "cyto_test", "index": 99, "i')
    assert run_infer(cyto, out, "--batch_size", "3") == 0
    assert out.read_bytes() == reference.read_bytes()
    # a complete output is left alone (no model load, nothing appended)
    assert run_infer(cyto, out) == 0
    assert out.read_bytes() == reference.read_bytes()


def test_resume_refuses_another_inputs_output(cyto, reference, tmp_path, caplog):
    out = tmp_path / "other.jsonl"
    lines = reference.read_text().splitlines(keepends=True)
    other = json.loads(lines[1])
    other["id"]["id"] = "someone-else"
    out.write_text(lines[0] + json.dumps(other) + "\n")
    caplog.set_level(logging.ERROR)
    assert run_infer(cyto, out) == 1
    assert "belongs to another input" in caplog.text and "--overwrite" in caplog.text
    assert run_infer(cyto, out, "--overwrite", "--max_samples", "2", "--max_new_tokens", "2") == 0
    assert [x["id"]["index"] for x in read_lines(out)] == [0, 1]
    # a resume with other generation settings would mix two set-ups in one file: refused
    caplog.clear()
    assert run_infer(cyto, out, "--max_samples", "3", "--max_new_tokens", "3") == 1
    assert "other settings (max_new_tokens: 2 -> 3)" in caplog.text
    assert len(read_lines(out)) == 2
    # the same settings (batch size and device may differ) extend it
    assert run_infer(cyto, out, "--max_samples", "3", "--max_new_tokens", "2", "--batch_size", "1") == 0
    assert [x["id"]["index"] for x in read_lines(out)] == [0, 1, 2]


def test_sampling_with_seed_is_reproducible(cyto, tmp_path):
    outs = []
    for k in range(2):
        out = tmp_path / f"s{k}.jsonl"
        assert run_infer(cyto, out, "--max_samples", "3", "--max_new_tokens", "8", "--temperature", "0.95",
                         "--seed", "7", "--batch_size", "2") == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_vllm_absent_and_unknown_template(cyto, tmp_path, caplog, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    caplog.set_level(logging.ERROR)
    assert run_infer(cyto, tmp_path / "v.jsonl", "--engine", "vllm") == 1
    msg = caplog.text
    assert "vLLM is not installed" in msg and "--engine transformers" in msg
    assert not (tmp_path / "v.jsonl").exists()
    caplog.clear()
    assert run_infer(cyto, tmp_path / "t.jsonl", "--template", "llama3") == 1
    assert "unknown template 'llama3'" in caplog.text and "qwen2_vl" in caplog.text


def test_over_long_prompt_is_cut_as_llamafactory_or_refused_in_chat(cyto):
    """The cutoff follows LLaMA-Factory's infer_seqlen (data/processor/processor_utils.py) as its
    unsupervised processor applies it for vllm_infer: prompt kept whole iff cutoff - label >= prompt (when
    the label is short); one token less and the prompt's last token is cut (``input_ids[:source_len]``).
    ``chat --image`` (truncate=False) refuses such a prompt instead."""
    from transformers import AutoTokenizer

    from slidechat.inference.loop import CytologyItem, _Qwen2VLText
    from slidechat.utils.errors import SlideChatError

    tok = AutoTokenizer.from_pretrained(cyto["model"])
    q, a = "Locate all dark nuclei in this field of view, please.", "No."

    def item():
        return CytologyItem(position=0, key={}, images=["x.png"], system=None, label_content=a,
                            messages=[{"role": "user", "content": f"<image>{q}"}], source="cyto.jsonl row 0")

    prompt = (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
              f"<|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n")
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    n_prompt = len(prompt_ids)
    n_label = len(tok(a + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
    assert 2 * n_label < n_prompt  # the short-label branch of the rule
    it = item()
    _Qwen2VLText(tok, cutoff_len=n_prompt + n_label).render(it)
    assert it.prompt_text == prompt and it.label == a + "\n" and not it.truncated
    it = item()
    _Qwen2VLText(tok, cutoff_len=n_prompt + n_label - 1).render(it)
    assert it.truncated and it.prompt_ids == prompt_ids[:-1] and it.label == a + "\n"
    with pytest.raises(SlideChatError, match="would cut it to"):
        _Qwen2VLText(tok, cutoff_len=n_prompt + n_label - 1, truncate=False).render(item())
    with pytest.raises(SlideChatError, match="characters.*not tokenized"):  # far over: never tokenized
        _Qwen2VLText(tok, cutoff_len=2, truncate=False).render(item())
    with pytest.raises(SlideChatError, match="drops an image placeholder"):  # the image cannot be fed
        _Qwen2VLText(tok, cutoff_len=8).render(item())


def test_chat_on_one_image_scripted_stdin(cyto):
    img = cyto["data"] / "imgs" / "field_0.png"
    q1, q2 = "Locate all dark 0.", "Any other abnormal cells?"
    cmd = [str(BIN / "slidechat"), "chat", "--image", str(img), "--model_name_or_path", str(cyto["model"]),
           "--max-new-tokens", "6", "--jsonl", "--show-prompt"]
    res = subprocess.run(cmd, input=f"{q1}\n\n{q2}\nexit\nnever asked\n", capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    turns = [json.loads(x) for x in res.stdout.splitlines()]
    assert [t["turn"] for t in turns] == [1, 2] and [t["question"] for t in turns] == [q1, q2]
    prompts = [p.split(" ---\n", 1)[1].rsplit("\n---", 1)[0]
               for p in res.stderr.split("--- prompt (turn ")[1:]]
    span = "<|vision_start|><|image_pad|><|vision_end|>"
    assert prompts[0] == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{span}{q1}"
                          f"<|im_end|>\n<|im_start|>assistant\n")
    a1 = turns[0]["answer"]
    assert prompts[1] == prompts[0] + (f"{a1}<|im_end|>\n<|im_start|>user\n{q2}<|im_end|>\n"
                                       "<|im_start|>assistant\n")
    # the library session gives the CLI's first answer (greedy, boxes/special tokens kept as generated)
    from slidechat.apps.chat import ImageChatSession
    from slidechat.model.qwen2vl import load_qwen2vl

    model, processor = load_qwen2vl(cyto["model"])
    session = ImageChatSession(model, processor, img, max_new_tokens=6)
    assert session.ask(q1) == a1


def test_chat_image_needs_a_model(cyto, caplog):
    from slidechat.cli.main import main

    caplog.set_level(logging.ERROR)
    assert main(["chat", "--image", str(cyto["data"] / "imgs" / "field_0.png")]) == 1
    assert "--model_name_or_path" in caplog.text


# ------------------------------------------------------------------ the generic loop and writers

@dataclass
class FakeItem:
    position: int
    key: dict
    images: list
    prompt: str = ""
    label: str = ""
    error: Optional[str] = None
    output: Optional[str] = None


class FakeFamily:
    """Upper-cases prompts; 'unreadable' rows fail in prepare, 'poison' rows fail a whole batch."""

    def __init__(self):
        self.calls = []

    def prepare(self, item):
        from slidechat.utils.errors import SlideChatError

        if "unreadable" in item.prompt:
            raise SlideChatError("cannot read image", item.images[0])
        item.label = "L" + item.prompt

    def generate(self, items):
        from slidechat.utils.errors import SlideChatError

        self.calls.append([it.position for it in items])
        if any("poison" in it.prompt for it in items):
            raise SlideChatError("generation failed on a poison row")
        return [it.prompt.upper() for it in items]


def _fake_items(prompts):
    from slidechat.inference.writers import make_id

    return [FakeItem(i, make_id("d", i, None), [f"/x/{i}.png"], prompt=p) for i, p in enumerate(prompts)]


def test_loop_errors_per_row_and_batch_retry(tmp_path):
    from slidechat.inference.loop import run_inference
    from slidechat.inference.writers import JsonlPredictionWriter
    from slidechat.utils.resumable import ResultWriter

    prompts = ["a", "unreadable b", "c", "poison d", "e", "f", "g"]
    items = _fake_items(prompts)
    fam = FakeFamily()
    with JsonlPredictionWriter(tmp_path / "o.jsonl", [(it.key, it.images) for it in items]) as w:
        assert isinstance(w, ResultWriter)
        stats = run_inference(items, w, fam, batch_size=3, progress=False)
    lines = read_lines(tmp_path / "o.jsonl")
    assert [x["id"]["index"] for x in lines] == list(range(len(prompts)))
    assert [x["predict"] for x in lines] == ["A", "", "C", "", "E", "F", "G"]
    assert "cannot read image" in lines[1]["error"] and "/x/1.png" in lines[1]["error"]
    assert "poison" in lines[3]["error"]
    assert (stats.written, stats.errors) == (7, 2)
    # batch [3,4,5] failed once as a whole, then each row alone; the bad row never reached generate
    assert fam.calls == [[0, 2], [3, 4, 5], [3], [4], [5], [6]]


def test_jsonl_writer_resume_torn_tail_and_lock(tmp_path):
    from slidechat.inference.loop import run_inference
    from slidechat.inference.writers import JsonlPredictionWriter
    from slidechat.utils.errors import SlideChatError

    items = _fake_items([f"p{i}" for i in range(5)])
    keys = [(it.key, it.images) for it in items]
    path = tmp_path / "o.jsonl"
    w = JsonlPredictionWriter(path, keys)
    with pytest.raises(SlideChatError, match="another process"):
        JsonlPredictionWriter(path, keys)
    run_inference(items[:2], w, FakeFamily(), batch_size=2, progress=False)
    with pytest.raises(SlideChatError, match="next pending rows"):
        w.write([items[3]])
    w.close()
    with open(path, "ab") as f:
        f.write(b'{"id": {"dat')
    items = _fake_items([f"p{i}" for i in range(5)])
    fam = FakeFamily()
    with JsonlPredictionWriter(path, keys) as w2:
        assert (w2.done, w2.num_pending) == (2, 3)
        run_inference(items, w2, fam, batch_size=2, progress=False)
    assert fam.calls == [[2, 3], [4]]
    assert [x["predict"] for x in read_lines(path)] == [f"P{i}" for i in range(5)]
    # a corrupt complete line is not a torn write: refused, naming the line
    path.write_text(path.read_text().replace('"P1"', '"P1'))
    with pytest.raises(SlideChatError, match="line 2 is not valid JSON"):
        JsonlPredictionWriter(path, keys)
    # more lines than the input has: another input's output
    path.write_text(path.read_text().replace('"P1', '"P1"'))
    with pytest.raises(SlideChatError, match="another input"):
        JsonlPredictionWriter(path, keys[:2])


def test_slidebench_writer_follows_the_protocol(tmp_path):
    import csv

    from slidechat.inference.loop import run_inference
    from slidechat.data.slidebench import SlideBenchWriter
    from slidechat.utils.resumable import ResultWriter
    from slidechat.data.slidebench import read_slidebench

    src = tmp_path / "q.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ID", "Slide", "Question", "A", "B", "Answer"])
        for i in range(5):
            w.writerow([f"q{i}", f"S{i}", f"question {i}?", "tumor", "normal", "A"])
    table = read_slidebench(src)

    class Fam:
        def prepare(self, item):
            pass

        def generate(self, items):
            return ["A. tumor" if it.index % 2 else "B" for it in items]

    out = tmp_path / "out.csv"
    with SlideBenchWriter(table, out) as wr:
        assert isinstance(wr, ResultWriter)
        items = [wr.make_item(i) for i in range(len(table))]
        run_inference(items[:2], wr, Fam(), batch_size=2, progress=False)
    with SlideBenchWriter(table, out) as wr:
        items = [wr.make_item(i) for i in range(len(table))]
        stats = run_inference(items, wr, Fam(), batch_size=2, progress=False)
    assert (stats.already_done, stats.written) == (2, 3)
    with open(out, newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["ID"] for r in got] == [f"q{i}" for i in range(5)]
    assert [r["Pred"] for r in got] == ["B", "A", "B", "A", "B"]


def test_slidebench_through_the_shared_loop_equals_the_mmengine_loop(tmp_path_factory):
    """The SlideChat family in ``run_inference`` (SlideFamily + SlideBenchWriter) writes the same CSV as
    the mmengine test loop of ``slidechat test`` / ``xtuner test``, which delegates to that family."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_testing import BATCH, CONFIG, MAX_NEW, build_tiny_setup

    from slidechat.inference.loop import run_inference
    from slidechat.apps.test import TestOptions, build_test_runner
    from slidechat.model.checkpoint import resolve_checkpoint
    from slidechat.data.slidebench import SlideBenchWriter
    from slidechat.data.slidebench import read_slidebench

    setup = build_tiny_setup(tmp_path_factory.getbasetemp() / "slidechat_testing_setup")
    root = tmp_path_factory.mktemp("slide_loop")
    ref = root / "mmengine.csv"
    runner = build_test_runner(TestOptions(
        config=CONFIG, checkpoint=resolve_checkpoint(setup["ckpt"]), test_slide_csv=setup["csv"],
        test_output_csv=ref, feature_root=setup["feats"], batch_size=BATCH, max_new_tokens=MAX_NEW,
        cfg_options=setup["overrides"], work_dir=root / "wd"))
    runner.test()
    family = runner.test_loop.family
    out = root / "shared_loop.csv"
    with SlideBenchWriter(read_slidebench(setup["csv"]), out, feature_root=setup["feats"]) as w:
        items = [w.make_item(i) for i in w.indices]
        stats = run_inference(items, w, family, batch_size=BATCH, progress=False)
    assert (stats.written, stats.errors) == (len(items), 1)  # the row without features
    assert out.read_bytes() == ref.read_bytes()


def test_prefix_reuse_gives_the_same_predictions_file(cyto, tmp_path):
    """Four questions of one field, two of another, one alone: ``slidechat infer`` writes the same bytes
    with prefix reuse (default) as with ``--no-prefix-reuse`` (every row its own full prompt)."""
    from PIL import Image

    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, (w, h) in enumerate([(84, 56), (56, 84), (70, 70)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(data / "imgs" / f"f{i}.png")
    questions = ["Locate all dark.", "Is this field normal?", "Classify the most abnormal cell in this field.",
                 "Count the cells."]
    with open(data / "multi.jsonl", "w", encoding="utf-8") as f:
        for img, n in ((0, 4), (1, 2), (2, 1)):
            for q in questions[:n]:
                f.write(json.dumps({"messages": [{"role": "user", "content": f"<image>{q}"},
                                                 {"role": "assistant", "content": "None."}],
                                    "images": [f"imgs/f{img}.png"]}) + "\n")
    info = {"multi": {"file_name": "multi.jsonl", "formatting": "sharegpt",
                      "columns": {"messages": "messages", "images": "images"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant"}}}
    (data / "dataset_info.json").write_text(json.dumps(info))
    outs = []
    for extra in ([], ["--no-prefix-reuse"]):
        out = tmp_path / f"pred{len(extra)}.jsonl"
        assert run_infer(cyto, out, "--dataset", "multi", "--dataset_dir", str(data), "--batch_size", "3",
                         "--max_new_tokens", "8", *extra) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert len(read_lines(tmp_path / "pred0.jsonl")) == 7

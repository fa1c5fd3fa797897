"""Chat template, SlideInstruction dataset and batch collation on a tiny offline Qwen2 tokenizer."""

import json

import numpy as np
import pytest
import torch

from slidechat.data.collate import slidechat_collate_fn
from slidechat.data.dataset import SlideInstructionDataset, uniform_indices
from slidechat.data.template import ConversationError, encode_conversation, encode_prompt
from slidechat.features.io import write_feature_h5, write_slidechat_csv
from slidechat.model.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from slidechat.utils.errors import SlideChatError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from slidechat.model.tiny_llm import make_tiny_llm

    folder = make_tiny_llm(tmp_path_factory.mktemp("tiny_llm_data"))
    return AutoTokenizer.from_pretrained(folder)


def _conv(q, a, *more):
    msgs = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    for k in range(0, len(more), 2):
        msgs += [{"from": "human", "value": more[k]}, {"from": "gpt", "value": more[k + 1]}]
    return msgs


def _answer_text(tok, ids, labels):
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def test_single_turn_template_and_labels(tokenizer):
    enc = encode_conversation(tokenizer, _conv("What is the diagnosis?\n<image>", "Carcinoma."))
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    pos = ids.index(IMAGE_TOKEN_INDEX)
    assert labels[pos] == IGNORE_INDEX
    # image moved to the front of the first user turn
    assert tokenizer.decode(ids[:pos]) == "<|im_start|>user\n"
    text = tokenizer.decode(ids[pos + 1:])
    assert text == ("\nWhat is the diagnosis?<|im_end|>\n<|im_start|>assistant\n"
                    "Carcinoma.<|im_end|>\n")
    # loss only on the answer and its <|im_end|>
    assert _answer_text(tokenizer, ids, labels) == "Carcinoma.<|im_end|>"
    assert labels[-1] == IGNORE_INDEX  # the "\n" separator carries no loss


def test_multi_turn_labels_and_prompt_prefix(tokenizer):
    conv = _conv("<image>\nDescribe the slide.", "Tumor cells.", "Is there necrosis?", "Yes.")
    enc = encode_conversation(tokenizer, conv)
    ids, labels = enc["input_ids"], enc["labels"]
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert _answer_text(tokenizer, ids, labels) == "Tumor cells.<|im_end|>Yes.<|im_end|>"
    prompt = encode_prompt(tokenizer, [("<image>\nDescribe the slide.", "Tumor cells.")],
                           "Is there necrosis?")
    assert tokenizer.decode([i for i in prompt if i >= 0]).endswith(
        "<|im_start|>user\nIs there necrosis?<|im_end|>\n<|im_start|>assistant\n")
    # the generation prompt is exactly the training sequence up to the second answer
    assert ids[:len(prompt)] == prompt
    # a first-turn prompt without <image> still gets the slide in front
    p0 = encode_prompt(tokenizer, [], "Question?\nA. x\nB. y")
    assert p0.count(IMAGE_TOKEN_INDEX) == 1 and p0.index(IMAGE_TOKEN_INDEX) < 5


@pytest.mark.parametrize("conv,msg", [
    ([{"from": "human", "value": "no image here"}, {"from": "gpt", "value": "x"}], "<image>"),
    ([{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "  "}], "empty answer"),
    ([{"from": "human", "value": "<image> q"}], "no answer"),
    ([{"from": "robot", "value": "<image> q"}], "unknown role"),
    ([], "non-empty"),
])
def test_conversation_errors(tokenizer, conv, msg):
    with pytest.raises(ConversationError, match=msg):
        encode_conversation(tokenizer, conv)


# ----------------------------------------------------------------------------- dataset

def _write_slide(folder, name, n, dim=512, fmt="h5", seed=0, nan=False):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    feats[:, 0] = np.arange(n)  # row index, to check subsampling
    if nan:
        feats[n // 2, 3] = np.nan
    if fmt == "h5":
        coords = np.stack([np.arange(n) * 224, np.zeros(n)], 1).astype(np.int64)
        write_feature_h5(folder / f"{name}.h5", feats, coords)
    else:
        write_slidechat_csv(folder / f"{name}.csv", feats)
    return feats


@pytest.fixture()
def feature_root(tmp_path):
    root = tmp_path / "feats"
    root.mkdir()
    _write_slide(root, "slideA", 50, fmt="h5")
    _write_slide(root, "slideB", 30, fmt="csv", seed=1)
    _write_slide(root, "slideNaN", 10, nan=True)
    return root


def _write_json(path, rows, jsonl=False):
    if jsonl:
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        path.write_text(json.dumps(rows))
    return path


GOOD = [
    {"id": "train::0", "image": ["slideA.csv"], "conversations": _conv("Describe.\n<image>", "Tumor.")},
    {"id": "train::1", "image": ["slideB.csv"],
     "conversations": _conv("<image>\nWhat?", "Necrosis is present.", "Grade?", "High grade.")},
]


def test_dataset_loads_prefers_h5_and_subsamples(tokenizer, feature_root, tmp_path):
    data = _write_json(tmp_path / "train.json", GOOD)
    ds = SlideInstructionDataset(data, tokenizer, feature_root=feature_root, max_patches=20)
    assert len(ds) == 2
    assert ds.rows[0]["path"].suffix == ".h5"  # named .csv in the JSON, H5 preferred
    assert ds.rows[1]["path"].suffix == ".csv"  # only a CSV exists
    a = ds[0]
    assert a["features"].shape == (20, 512) and a["features"].dtype == torch.float32
    expected = uniform_indices(50, 20)
    assert np.array_equal(expected, np.linspace(0, 49, 20, dtype=np.int64))
    assert torch.equal(a["features"][:, 0], torch.tensor(expected, dtype=torch.float32))
    assert torch.equal(a["coords"][:, 0], torch.tensor(expected * 224))
    b = ds[1]
    assert b["features"].shape == (20, 512) and b["coords"] is None
    assert (b["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 1
    # JSONL gives the same rows
    ds2 = SlideInstructionDataset(_write_json(tmp_path / "train.jsonl", GOOD, jsonl=True), tokenizer,
                                  feature_root=feature_root, max_patches=20)
    assert torch.equal(ds2[1]["input_ids"], b["input_ids"])


def test_max_length_drops_patches_then_truncates_text(tokenizer, feature_root, tmp_path):
    data = _write_json(tmp_path / "train.json", GOOD[:1])
    full = SlideInstructionDataset(data, tokenizer, feature_root=feature_root)[0]
    n_text = len(full["input_ids"])
    assert full["features"].shape[0] == 50
    # budget for text + 7 visual tokens: patches dropped uniformly, text intact
    ds = SlideInstructionDataset(data, tokenizer, feature_root=feature_root, max_length=n_text - 1 + 7)
    item = ds[0]
    assert item["features"].shape[0] == 7
    assert torch.equal(item["features"][:, 0], torch.tensor(uniform_indices(50, 7), dtype=torch.float32))
    assert torch.equal(item["input_ids"], full["input_ids"])
    assert len(item["input_ids"]) - 1 + item["features"].shape[0] == ds.max_length
    # text alone too long: text truncated, min_patches kept
    ds = SlideInstructionDataset(data, tokenizer, feature_root=feature_root, max_length=n_text - 3,
                                 min_patches=2)
    item = ds[0]
    assert item["features"].shape[0] == 2
    assert len(item["input_ids"]) - 1 + 2 == n_text - 3


def _bad_rows():
    return {
        "missing feature file": {"id": "bad::missing", "image": ["nope.csv"],
                                 "conversations": _conv("<image> q", "a")},
        "no <image>": {"id": "bad::noimage", "image": ["slideA.csv"],
                       "conversations": _conv("q without slide", "a")},
        "empty answer": {"id": "bad::empty", "image": ["slideA.csv"],
                         "conversations": _conv("<image> q", "")},
        "missing 'image'": {"id": "bad::noimagekey", "conversations": _conv("<image> q", "a")},
    }


@pytest.mark.parametrize("kind", list(_bad_rows()))
def test_bad_rows_raise_named_errors(tokenizer, feature_root, tmp_path, kind):
    bad = _bad_rows()[kind]
    data = _write_json(tmp_path / "train.json", GOOD + [bad])
    with pytest.raises(SlideChatError) as ei:
        SlideInstructionDataset(data, tokenizer, feature_root=feature_root)
    msg = str(ei.value)
    assert str(data) in msg and "row 2" in msg and bad["id"] in msg
    key = {"missing feature file": "not found", "no <image>": "<image>",
           "empty answer": "empty answer", "missing 'image'": "'image'"}[kind]
    assert key in msg


def test_row_source_field_does_not_replace_the_file_in_errors(tokenizer, feature_root, tmp_path):
    # a SlideChat row may carry its own "source" (the corpus it came from): errors still name the file
    bad = dict(_bad_rows()["no <image>"], source="PathText")
    data = _write_json(tmp_path / "train.json", GOOD + [bad])
    with pytest.raises(SlideChatError) as ei:
        SlideInstructionDataset(data, tokenizer, feature_root=feature_root)
    assert str(ei.value.path) == str(data) and "row 2" in str(ei.value)


def test_malformed_json_and_nan_and_skip_bad(tokenizer, feature_root, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "x", "image": ["slideA.csv"], ')
    with pytest.raises(SlideChatError, match="malformed JSON") as ei:
        SlideInstructionDataset(broken, tokenizer, feature_root=feature_root)
    assert str(broken) in str(ei.value)
    jl = tmp_path / "broken.jsonl"
    jl.write_text(json.dumps(GOOD[0]) + "\n{oops\n")
    with pytest.raises(SlideChatError, match="line 2"):
        SlideInstructionDataset(jl, tokenizer, feature_root=feature_root)

    nan_row = {"id": "bad::nan", "image": ["slideNaN.csv"], "conversations": _conv("<image> q", "a")}
    data = _write_json(tmp_path / "train.json", GOOD + [nan_row])
    ds = SlideInstructionDataset(data, tokenizer, feature_root=feature_root)  # NaN seen at load only
    with pytest.raises(SlideChatError, match="NaN") as ei:
        ds[2]
    assert "slideNaN.h5" in str(ei.value) and "bad::nan" in str(ei.value)
    assert "(1 of 10 patches)" in str(ei.value)

    rows = GOOD + list(_bad_rows().values()) + [nan_row, ["not", "an", "object"]]
    data = _write_json(tmp_path / "mixed.json", rows)
    ds = SlideInstructionDataset(data, tokenizer, feature_root=feature_root, skip_bad=True)
    assert ds.num_skipped == 5 and len(ds) == 3
    item = ds[2]  # the NaN slide is replaced by the next good row and counted
    assert ds.num_skipped_at_load == 1
    assert item["id"] == "train::0"


def test_collate_batch_of_two(tokenizer, feature_root, tmp_path):
    data = _write_json(tmp_path / "train.json", GOOD)
    ds = SlideInstructionDataset(data, tokenizer, feature_root=feature_root, max_patches=20)
    a, b = ds[0], ds[1]
    assert len(a["input_ids"]) != len(b["input_ids"])
    batch = slidechat_collate_fn([a, b])
    assert batch["data_samples"] is None
    d = batch["data"]
    L = max(len(a["input_ids"]), len(b["input_ids"]))
    assert d["input_ids"].shape == d["labels"].shape == d["attention_mask"].shape == (2, L)
    pad = tokenizer.pad_token_id
    assert pad == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for row, item in enumerate([a, b]):
        n = len(item["input_ids"])
        assert torch.equal(d["input_ids"][row, :n], item["input_ids"])
        assert torch.all(d["input_ids"][row, n:] == pad)
        assert torch.all(d["attention_mask"][row, :n] == 1) and torch.all(d["attention_mask"][row, n:] == 0)
        assert torch.all(d["labels"][row, n:] == IGNORE_INDEX)
        ids, labels = d["input_ids"][row], d["labels"][row]
        assert labels[ids == IMAGE_TOKEN_INDEX].item() == IGNORE_INDEX
        # everything up to "assistant\n" (user tokens) is masked
        first_label = int((labels != IGNORE_INDEX).nonzero()[0])
        assert tokenizer.decode(ids[:first_label][ids[:first_label] >= 0]).endswith(
            "<|im_start|>assistant\n")
    assert _answer_text(tokenizer, d["input_ids"][1].tolist(), d["labels"][1].tolist()) == \
        "Necrosis is present.<|im_end|>High grade.<|im_end|>"
    assert [f.shape[0] for f in d["features"]] == [20, 20]
    assert d["coords"][0] is not None and d["coords"][1] is None
    assert d["ids"] == ["train::0", "train::1"]


def test_synthetic_instructions_deterministic(tmp_path):
    import csv as _csv

    from slidechat.data.synthetic import VQA_COLUMNS, write_synthetic_dataset
    from slidechat.data.template import normalize_conversation

    man = tmp_path / "manifest.csv"
    with open(man, "w", newline="") as f:
        w = _csv.writer(f)
        w.writerow(["slide", "path", "label"])
        for i, lab in enumerate(["tumor", "normal", "inflamed", "necrotic"]):
            w.writerow([f"s{i}", f"s{i}.tiff", lab])
    a = write_synthetic_dataset(man, tmp_path / "a", seed=3)
    b = write_synthetic_dataset(man, tmp_path / "b", seed=3)
    for k in a:
        assert a[k].read_bytes() == b[k].read_bytes()
    stage2 = json.loads(a["stage2"].read_text())
    for row in json.loads(a["stage1"].read_text()) + stage2:
        normalize_conversation(row["conversations"])  # valid SlideChat rows
    with open(a["test_vqa"]) as f:
        rows = list(_csv.DictReader(f))
    assert list(rows[0]) == VQA_COLUMNS
    assert len({r["Broad Category"] for r in rows}) >= 2
    for r in rows:
        assert r["Answer"] in "ABCD" and r[r["Answer"]]
    tumor_row = next(r for r in rows if r["Slide"] == "s0" and r["Narrow Category"] == "Tissue type")
    assert tumor_row[tumor_row["Answer"]] == "tumor"


def test_synthetic_holdout_keeps_test_slides_out_of_training(tmp_path):
    import csv as _csv

    from slidechat.data.synthetic import write_synthetic_dataset
    from slidechat.utils.errors import SlideChatError

    man = tmp_path / "manifest.csv"
    labels = ["tumor", "normal", "inflamed", "necrotic"] * 3
    with open(man, "w", newline="") as f:
        w = _csv.writer(f)
        w.writerow(["slide", "path", "label"])
        for i, lab in enumerate(labels):
            w.writerow([f"s{i}", f"s{i}.tiff", lab])
    p = write_synthetic_dataset(man, tmp_path / "d", seed=0, holdout_every=3, mcq_variants=2)
    train_slides = {r["image"][0][:-4] for k in ("stage1", "stage2")
                    for r in json.loads(p[k].read_text())}
    with open(p["test_vqa"]) as f:
        test_slides = {r["Slide"] for r in _csv.DictReader(f)}
    assert test_slides == {"s2", "s5", "s8", "s11"}
    assert not (train_slides & test_slides) and len(train_slides) == 8
    assert {labels[int(s[1:])] for s in test_slides} == set(labels)  # every class is tested
    stage2 = json.loads(p["stage2"].read_text())
    tissue = [r for r in stage2 if "Which tissue type" in r["conversations"][0]["value"]]
    assert len(tissue) == 16  # 8 training slides x 2 variants, answered with the option text
    assert all(r["conversations"][1]["value"] in labels for r in tissue)
    with pytest.raises(SlideChatError):
        write_synthetic_dataset(man, tmp_path / "e", holdout_every=20)


def test_load_features_require_finite(feature_root):
    from slidechat.features.io import load_features

    feats, _ = load_features(feature_root / "slideNaN.h5")  # reading alone does not judge values
    assert np.isnan(feats).sum() == 1
    with pytest.raises(SlideChatError, match=r"NaN/Inf \(1 of 10 patches\)") as ei:
        load_features(feature_root / "slideNaN.h5", require_finite=True)
    assert "slideNaN.h5" in str(ei.value)
    assert load_features(feature_root / "slideA.h5", require_finite=True)[0].shape == (50, 512)

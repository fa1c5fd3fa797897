"""``slidechat serve``'s chat: sessions, streaming, evidence in slide coordinates, cytology boxes, reports.

Driven through the app (FastAPI TestClient) on the tiny slides and tiny models of serve_fixtures; the
cytology box test uses a tiny Qwen2-VL taught to answer one sentence with a box (serve_box_model).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_box_model import BOX_ANSWER, BOX_QUESTION, teach_box_model  # noqa: E402
from serve_fixtures import build_serve_setup  # noqa: E402

from slidechat.apps.chat import ChatSession  # noqa: E402
from slidechat.apps.serve import sessions as sessions_mod  # noqa: E402
from slidechat.apps.serve.app import create_app  # noqa: E402
from slidechat.apps.serve.config import ServeConfig  # noqa: E402
from slidechat.apps.serve.sessions import (ChatRequestError, GenerationCancelled, field_rect,  # noqa: E402
                                          load_engine)
from slidechat.features.io import load_features  # noqa: E402

SLIDE = "demo_000_tumor"
OTHER = "demo_001_normal"
MAX_NEW = 8

#: the Host TestClient sends: an app bound to loopback answers loopback names only (DNS rebinding)
LOCAL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_serve_setup(tmp_path_factory.getbasetemp() / "serve_setup")


@pytest.fixture(scope="module")
def slide_engine(setup):
    return load_engine(checkpoint=str(setup["slide_model"]), max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def client(setup, slide_engine):
    app = create_app(ServeConfig(slides=setup["slides"], features=setup["features"]), slide_engine)
    with TestClient(base_url=LOCAL, app=app) as c:
        yield c


@pytest.fixture(scope="module")
def cyto_client(setup, tmp_path_factory):
    box_dir = teach_box_model(setup["qwen2vl"], tmp_path_factory.getbasetemp() / "serve_box_model")
    engine = load_engine(model_name_or_path=str(box_dir), max_new_tokens=40)
    with TestClient(base_url=LOCAL, app=create_app(ServeConfig(slides=setup["cyto_slides"]), engine)) as c:
        yield c, engine


def _h5(setup, slide):
    path = Path(setup["h5"]) / f"{slide}.h5"
    with h5py.File(path, "r") as f:
        return path, np.asarray(f["coords"]), int(f["coords"].attrs["patch_size_level0"]), \
            (int(f.attrs["level0_width"]), int(f.attrs["level0_height"]))


def _ask(client, slide, question, session=None, field=None, status=200):
    r = client.post("/api/chat", json={"slide": slide, "question": question, "session": session, "field": field})
    assert r.status_code == status, r.text
    return r.json()


def test_model_line_says_tiny_and_features(client):
    m = client.get("/api/model").json()
    assert m["family"] == "slide"
    assert m["model_line"].startswith("model: slide_model (")
    assert "TINY TEST MODEL" in m["model_line"] and "Qwen2ForCausalLM" in m["model_line"]
    assert "features: tiny_test 512-d" in m["model_line"]


def test_two_turns_keep_the_session_and_match_a_plain_chat(client, slide_engine, setup):
    q1, q2 = "What tissue is this?", "And the grade?"
    a = _ask(client, SLIDE, q1)
    b = _ask(client, SLIDE, q2, session=a["session"])
    assert (a["turn"], b["turn"]) == (1, 2) and b["session"] == a["session"]
    chat = slide_engine.session(a["session"]).chat
    prompt = slide_engine.tokenizer.decode([t for t in chat.last_prompt_ids if t >= 0])
    # the second prompt is the conversation: question 1, its answer, question 2, in that order
    assert prompt.index(q1) < prompt.index(a["answer"]) < prompt.index(q2)
    # the served answers (prefix kept across turns) are what a fresh chat without prefix reuse says
    path, *_ = _h5(setup, SLIDE)
    feats, coords = load_features(path)
    plain = ChatSession(slide_engine.model, slide_engine.tokenizer, feats, coords, max_new_tokens=MAX_NEW,
                        prefix_reuse=False)
    assert [plain.ask(q1), plain.ask(q2)] == [a["answer"], b["answer"]]
    assert a["model_line"] == client.get("/api/model").json()["model_line"]


def test_stream_ends_with_the_plain_answer(client):
    q = "Describe the slide."
    plain = _ask(client, SLIDE, q)
    r = client.post("/api/chat/stream", json={"slide": SLIDE, "question": q})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
    assert lines[-1].get("done") is True
    tokens = [x["token"] for x in lines[:-1]]
    assert len(tokens) == len(lines) - 1 and tokens  # only token lines before the done line
    done = lines[-1]
    assert done["answer"] == plain["answer"]
    assert "".join(tokens).strip() == done["answer"]
    assert done["session"] != plain["session"] and done["turn"] == 1
    assert done["evidence"] == plain["evidence"]


def test_evidence_is_top_k_patches_inside_the_slide(client, setup):
    res = _ask(client, SLIDE, "Where is the tumour?")
    _, coords, patch, (W, H) = _h5(setup, SLIDE)
    ev = res["evidence"]
    assert len(ev) == min(10, len(coords))
    corners = {(int(x), int(y)) for x, y in coords}
    for e in ev:
        assert (e["x"], e["y"]) in corners and e["w"] == e["h"] == patch
        assert 0 <= e["x"] and e["x"] + e["w"] <= W and 0 <= e["y"] and e["y"] + e["h"] <= H
    scores = [e["score"] for e in ev]
    assert scores == sorted(scores, reverse=True) and len(set((e["x"], e["y"]) for e in ev)) == len(ev)


def test_evidence_png_covers_the_slide(client, setup):
    res = _ask(client, SLIDE, "Any necrosis?")
    assert res["evidence_url"] == f"/api/sessions/{res['session']}/turns/{res['turn']}/evidence.png"
    r = client.get(res["evidence_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    _, coords, patch, (W, H) = _h5(setup, SLIDE)
    assert img.mode == "RGBA"
    assert abs(img.size[0] / img.size[1] - W / H) < 0.01
    alpha = np.asarray(img)[..., 3]
    assert alpha.any() and not alpha.all()  # patches drawn, background (no patch) transparent
    # the top patch's centre is drawn
    top = res["evidence"][0]
    sx, sy = img.size[0] / W, img.size[1] / H
    assert alpha[int((top["y"] + patch / 2) * sy), int((top["x"] + patch / 2) * sx)] > 0
    missing = client.get(f"/api/sessions/{res['session']}/turns/99/evidence.png")
    assert missing.status_code == 404 and "turn 99" in missing.json()["error"]


def test_session_of_another_slide_starts_a_new_one(client):
    a = _ask(client, SLIDE, "What is this?")
    b = _ask(client, OTHER, "What is this?", session=a["session"])
    assert b["session"] != a["session"] and b["turn"] == 1
    c = _ask(client, SLIDE, "And now?", session=a["session"])
    assert c["session"] == a["session"] and c["turn"] == 2
    d = _ask(client, SLIDE, "Unknown session?", session="no-such-session")
    assert d["session"] != "no-such-session" and d["turn"] == 1


def test_bad_questions_are_clear_json_errors(client):
    long_q = "x" * 4001
    r = client.post("/api/chat", json={"slide": SLIDE, "question": long_q})
    assert r.status_code in (413, 422)
    assert "4001 characters" in r.json()["error"] and "4000" in r.json()["error"]
    r = client.post("/api/chat/stream", json={"slide": SLIDE, "question": long_q})
    assert r.status_code in (413, 422) and "characters" in r.json()["error"]
    r = client.post("/api/chat", json={"slide": SLIDE, "question": "   "})
    assert r.status_code == 422 and r.json()["error"] == "question is empty"
    r = client.post("/api/chat", json={"slide": "../../etc/passwd", "question": "hi"})
    assert r.status_code == 404 and "unknown slide" in r.json()["error"]
    r = client.post("/api/chat", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = client.post("/api/chat", json={"slide": SLIDE, "question": "hi", "field": {"x": "a"}})
    assert r.status_code == 422 and r.json()["error"].startswith("field:")
    r = client.post("/api/chat", content=json.dumps({"slide": SLIDE, "question": "x" * 70000}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()
    r = client.get("/api/sessions/nope/report.html")
    assert r.status_code == 404 and "unknown session" in r.json()["error"]


def test_report_is_self_contained_and_escaped(client, setup):
    evil = "Is this <script>alert('x')</script> & <b>bold</b>?"
    a = _ask(client, SLIDE, "What tissue is this?")
    _ask(client, SLIDE, evil, session=a["session"])
    r = client.get(f"/api/sessions/{a['session']}/report.html")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    text = r.text
    assert not re.search(r"https?://", text)
    assert "<script" not in text.lower() and "<b>bold" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;?" in text
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    assert len(srcs) >= 2 and all(s.startswith("data:image/") for s in srcs)
    assert not re.search(r'(?:href|src)="(?!data:)', text)
    assert "TINY TEST MODEL" in text and "demo_000_tumor" in text and "2560 x 2048" in text
    assert text.count('class="turn"') == 2
    # its own policy: the inline styles and data: pictures it holds, no script, no request anywhere (the
    # app's default policy, styles from the server only, would have stripped its styles)
    csp = r.headers["content-security-policy"]
    assert "style-src 'unsafe-inline'" in csp and "img-src data:" in csp and "default-src 'none'" in csp
    assert "script-src" not in csp and "<style" in text


def test_interrupted_answer_frees_the_model(slide_engine, setup):
    from slidechat.apps.serve.catalog import Catalog

    entry = Catalog(ServeConfig(slides=setup["slides"], features=setup["features"])).get(SLIDE)
    seen = []

    def stop(piece):
        seen.append(piece)
        raise GenerationCancelled()

    with pytest.raises(GenerationCancelled):
        slide_engine.ask(entry, "Stop me.", None, on_token=stop)
    assert seen and slide_engine.model_lock.acquire(blocking=False)
    slide_engine.model_lock.release()
    again = slide_engine.ask(entry, "Stop me.", None)
    fresh = slide_engine.ask(entry, "Stop me.", None)
    assert again.answer == fresh.answer and again.turn == 1


def test_sessions_are_bounded(slide_engine, setup, monkeypatch):
    from slidechat.apps.serve.catalog import Catalog

    monkeypatch.setattr(sessions_mod, "MAX_SESSIONS", 2)
    entry = Catalog(ServeConfig(slides=setup["slides"], features=setup["features"])).get(SLIDE)
    ids = [slide_engine.ask(entry, f"Question {i}", None).session for i in range(3)]
    with pytest.raises(sessions_mod.UnknownSession):
        slide_engine.session(ids[0])
    assert slide_engine.session(ids[2]).id == ids[2]


def test_features_extracted_on_demand_with_progress(setup, slide_engine, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(Path(setup["slides"]) / f"{SLIDE}.svs", slides / f"{SLIDE}.svs")
    engine = sessions_mod.ChatEngine("slide", slide_engine.model, slide_engine.tokenizer, "slide_model",
                                     max_new_tokens=MAX_NEW, encoder="tiny_test",
                                     feature_cache=tmp_path / "cache", extract_options={"num_workers": 0})
    with TestClient(base_url=LOCAL, app=create_app(ServeConfig(slides=slides), engine)) as c:
        r = c.post("/api/chat/stream", json={"slide": SLIDE, "question": "What is this?"})
        lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
        assert "progress" in lines[0] and "tiny_test" in lines[0]["progress"], lines[:2]
        assert lines[-1].get("done") is True, lines[-1]
        assert (tmp_path / "cache" / f"{SLIDE}.h5").is_file()
        ev = lines[-1]["evidence"]
        _, coords, patch, _ = _h5(setup, SLIDE)
        assert len(ev) == 10 and all(e["w"] == patch for e in ev)
        again = c.post("/api/chat/stream", json={"slide": SLIDE, "question": "What is this?"}).text
        assert '"progress"' not in again  # cached


def test_cytology_box_maps_to_level0(cyto_client):
    c, engine = cyto_client
    assert c.get("/api/model").json()["family"] == "cytology"
    # field 1200 x 900 level-0 px at (100, 200) is read as a 1024 x 768 image (long side 1024):
    # <region>40 60 120 140</region> -> x: 100 + 40 * 1200/1024 = 146.875 .. 100 + 120 * 1200/1024 = 240.625,
    # y: 200 + 60 * 900/768 = 270.3125 .. 200 + 140 * 900/768 = 364.0625
    res = _ask(c, "cyto_000", BOX_QUESTION, field={"x": 100, "y": 200, "w": 1200, "h": 900})
    assert res["answer"] == BOX_ANSWER and res["evidence"] == [] and res["evidence_url"] is None
    assert len(res["regions"]) == 1
    r = res["regions"][0]
    assert r["label"] == "atypical cell"
    assert abs(r["x"] - 146.875) <= 1 and abs(r["y"] - 270.3125) <= 1
    assert abs(r["x"] + r["w"] - 240.625) <= 1 and abs(r["y"] + r["h"] - 364.0625) <= 1
    # the whole 1536 px slide (no field) is read at 1024 px: scale 1.5
    whole = _ask(c, "cyto_000", BOX_QUESTION)
    w = whole["regions"][0]
    assert (w["x"], w["y"], w["w"], w["h"]) == (60, 90, 120, 120)
    # a session asked about another field starts anew
    other = _ask(c, "cyto_000", BOX_QUESTION, session=res["session"], field={"x": 0, "y": 0, "w": 512, "h": 512})
    assert other["session"] != res["session"]
    rep = c.get(f"/api/sessions/{res['session']}/report.html").text
    assert not re.search(r"https?://", rep) and "data:image/" in rep
    assert "&lt;region&gt;40 60 120 140&lt;/region&gt;" in rep


def test_field_rules():
    assert field_rect(None, (1536, 1536)) == {"x": 0, "y": 0, "w": 1536, "h": 1536}
    with pytest.raises(ChatRequestError, match="ask about a field"):
        field_rect(None, (5000, 3000))
    with pytest.raises(ChatRequestError, match="at most 4096"):
        field_rect({"x": 0, "y": 0, "w": 5000, "h": 100}, (8000, 8000))
    # clamped to the slide
    assert field_rect({"x": -10, "y": 900, "w": 100, "h": 500}, (1000, 1000)) == \
        {"x": 0, "y": 900, "w": 90, "h": 100}
    with pytest.raises(ChatRequestError, match="outside"):
        field_rect({"x": 2000, "y": 0, "w": 10, "h": 10}, (1000, 1000))


def test_features_of_another_width_are_a_clear_422(setup, slide_engine, tmp_path):
    from slidechat.features.io import write_feature_h5

    path, coords, patch, _ = _h5(setup, SLIDE)
    feats, _ = load_features(path)
    write_feature_h5(tmp_path / "h5_files" / f"{SLIDE}.h5", feats[:, :256], coords,
                     coords_attrs={"patch_size_level0": patch})
    app = create_app(ServeConfig(slides=setup["slides"], features=tmp_path), slide_engine)
    with TestClient(base_url=LOCAL, app=app) as c:
        r = c.post("/api/chat", json={"slide": SLIDE, "question": "What is this?"})
        assert r.status_code == 422
        err = r.json()["error"]
        assert f"{SLIDE}.h5" in err and "256" in err and "512" in err

"""``slidechat serve`` latency: deep-zoom tiles under 8 concurrent viewers, and the chat's time to first
token and tokens/s side by side with the terminal chat, same questions, same machine, same run.

Builds the serve tests' setup (``tests/serve_fixtures.build_serve_setup``: 3 demo slides of 2560x2048 px at
20x plus one PNG field, ``tiny_test`` features, a tiny random SlideChat exported as a folder) under
``--root`` (default ``work_dirs/bench_serve``), starts ``slidechat serve`` on it as a subprocess on
127.0.0.1 (a free port), then:

- **tiles**: ``--viewers`` threads (each its own keep-alive HTTP client) walk a zoom path the way
  OpenSeadragon asks for tiles: one slide each (round robin), a random point of interest (seeded), from the
  first DeepZoom level at least ``--min-level-side`` px wide down to full resolution, at each level the tiles
  a 1024x768 viewport centred on that point covers (at most ``--max-tiles`` per viewer). The same walks run
  three times: **cold** (a fresh server: every tile is read from the slide and encoded), **warm** (the
  same tiles again: the LRU tile cache), and **warm while the chat answers** (streamed questions asked
  back to back beside the viewers until they are through: the model has its own thread, tiles must not
  wait for it).
- **chat**: ``--questions`` asked in one conversation through ``POST /api/chat/stream`` (NDJSON): time to
  the first token, to the last token, and to the final ``done`` line (which also carries the answer's
  evidence, computed after the last token); then the same questions, in the same order, to
  ``slidechat chat --checkpoint <model> --features <the slide's H5> --jsonl`` driven through stdin (a
  ``reset`` line first, whose acknowledgement on stderr says the model is loaded; the terminal prints a
  whole answer at once, so its time to first token is its answer time). The same conversation also goes
  through ``POST /api/chat`` (no stream) to separate the stream's cost from the server's. All sides use the
  serve engine's ``max_new_tokens`` and prefix reuse across turns, greedy: the answers must be identical.
  ``--repeats`` conversations per side, serve and terminal in turns (the server idle meanwhile).

Token counts are the answers' generated tokens (the conversation replayed in this process with
``ChatSession``, which must reproduce the served answers); tokens/s = tokens / time to the last token
(serve) or to the answer line (terminal), prefill included; the stream's decode rate = tokens after the
first / (last token - first token). Prints Markdown tables; writes ``<root>/serve_latency.json`` and the
server's log, nothing outside ``--root``.

    .venv/bin/python benchmarks/serve_latency.py [--root work_dirs/bench_serve] [--viewers 8]
        [--max-tiles 60] [--questions "What is shown?" ...] [--threads 1]

(Not a pytest test: no function here is collected.)
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import queue
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_QUESTIONS = ["What is the diagnosis?", "Is there necrosis?", "Describe the tumor architecture."]
VIEWPORT = (1024, 768)
#: bounded waits (seconds): server start-up, one tile, one answer
START_TIMEOUT = 300.0
TILE_TIMEOUT = 60.0
ANSWER_TIMEOUT = 600.0
#: answers generated back to back beside the third tile pass, at most
MAX_BESIDE_ANSWERS = 50

Tile = Tuple[str, int, int, int]  # slide id, level, col, row


# ------------------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_server(setup: Dict[str, Any], port: int, log: Path, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "slidechat.cli.main", "serve", "--slides", str(setup["slides"]),
           "--features", str(setup["features"]), "--checkpoint", str(setup["slide_model"]),
           "--host", "127.0.0.1", "--port", str(port)]
    f = open(log, "w", encoding="utf-8")
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(threads), stdout=f, stderr=subprocess.STDOUT)
    f.close()  # the child holds its own descriptor
    return proc


def wait_ready(client: Any, proc: subprocess.Popen, log: Path) -> Dict[str, Any]:
    """``GET /api/model`` once the server answers (bounded); a server that exits is an error with its log."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"slidechat serve exited ({proc.returncode}); its log:\n"
                             + log.read_text(errors="replace")[-3000:])
        try:
            r = client.get("/api/model", timeout=2.0)
            if r.status_code == 200:
                return r.json()
        except Exception:  # not listening yet
            pass
        time.sleep(0.5)
    raise SystemExit(f"slidechat serve did not answer within {START_TIMEOUT:.0f} s; log: {log}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


# ------------------------------------------------------------------------------------------------------
# tiles


def dzi_geometry(client: Any, slide: str) -> Dict[str, int]:
    r = client.get(f"/api/slides/{slide}.dzi")
    r.raise_for_status()
    root = ET.fromstring(r.text)
    size = next(el for el in root.iter() if el.tag.endswith("Size"))
    return {"tile": int(root.get("TileSize")), "overlap": int(root.get("Overlap")),
            "width": int(size.get("Width")), "height": int(size.get("Height"))}


def zoom_walk(slide: str, geo: Dict[str, int], rng: np.random.Generator, min_side: int, max_tiles: int
              ) -> List[Tile]:
    """The tiles a viewer asks for zooming from an overview into a random point, level by level."""
    w, h, ts = geo["width"], geo["height"], geo["tile"]
    top = int(math.ceil(math.log2(max(w, h))))  # DeepZoom: level ``top`` is full resolution
    fx, fy = rng.uniform(0.2, 0.8, size=2)
    tiles: List[Tile] = []
    for level in range(top + 1):
        scale = 2.0 ** (top - level)
        lw, lh = max(1, math.ceil(w / scale)), max(1, math.ceil(h / scale))
        if max(lw, lh) < min_side:
            continue
        cx, cy = fx * lw, fy * lh
        x0, x1 = max(0.0, cx - VIEWPORT[0] / 2), min(float(lw), cx + VIEWPORT[0] / 2)
        y0, y1 = max(0.0, cy - VIEWPORT[1] / 2), min(float(lh), cy + VIEWPORT[1] / 2)
        for row in range(int(y0 // ts), int(math.ceil(y1 / ts))):
            for col in range(int(x0 // ts), int(math.ceil(x1 / ts))):
                tiles.append((slide, level, col, row))
    return tiles[:max_tiles]


def run_viewers(base: str, walks: List[List[Tile]]) -> Tuple[List[float], int, float]:
    """All walks at once, one thread and one keep-alive client each: (latencies in s, errors, wall s)."""
    import httpx

    lat: List[float] = []
    errors = [0]
    lock = threading.Lock()
    start = threading.Barrier(len(walks))

    def viewer(walk: List[Tile]) -> None:
        mine: List[float] = []
        bad = 0
        with httpx.Client(base_url=base, timeout=TILE_TIMEOUT) as c:
            start.wait()
            for slide, level, col, row in walk:
                t0 = time.perf_counter()
                try:
                    r = c.get(f"/api/slides/{slide}_files/{level}/{col}_{row}.jpeg")
                    ok = r.status_code == 200 and r.content[:2] == b"\xff\xd8"
                except httpx.HTTPError:
                    ok = False
                mine.append(time.perf_counter() - t0)
                bad += not ok
        with lock:
            lat.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=viewer, args=(w,)) for w in walks]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, errors[0], time.perf_counter() - t0


def tile_row(name: str, lat: List[float], errors: int, wall: float) -> Dict[str, Any]:
    a = np.asarray(lat) * 1000.0
    return {"pass": name, "requests": len(lat), "errors": errors, "p50_ms": float(np.percentile(a, 50)),
            "p95_ms": float(np.percentile(a, 95)), "max_ms": float(a.max()), "tiles_per_s": len(lat) / wall}


# ------------------------------------------------------------------------------------------------------
# chat


def stream_question(client: Any, slide: str, question: str, session: Optional[str]) -> Dict[str, Any]:
    """One ``/api/chat/stream`` answer: first/last token and done times (s from the request), pieces."""
    body = {"slide": slide, "question": question, "session": session}
    t0 = time.perf_counter()
    first = last = None
    pieces = 0
    done: Optional[Dict[str, Any]] = None
    with client.stream("POST", "/api/chat/stream", json=body, timeout=ANSWER_TIMEOUT) as r:
        if r.status_code != 200:
            raise SystemExit(f"/api/chat/stream answered {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.strip():
                continue
            msg = json.loads(line)
            now = time.perf_counter() - t0
            if "token" in msg:
                pieces += 1
                first = now if first is None else first
                last = now
            elif "error" in msg:
                raise SystemExit(f"/api/chat/stream: {msg['error']}")
            elif msg.get("done"):
                done = dict(msg, t=now)
    if done is None:
        raise SystemExit("/api/chat/stream ended without a done line")
    return {"question": question, "answer": done["answer"], "session": done["session"],
            "first_s": first if first is not None else done["t"], "last_s": last if last is not None else done["t"],
            "done_s": done["t"], "pieces": pieces, "evidence": len(done.get("evidence") or [])}


def terminal_chat(setup: Dict[str, Any], h5: Path, questions: List[str], max_new: int, threads: int,
                  log: Path) -> List[Dict[str, Any]]:
    """The same questions to ``slidechat chat --jsonl`` through stdin, each timed to its answer line."""
    cmd = [sys.executable, "-m", "slidechat.cli.main", "chat", "--checkpoint", str(setup["slide_model"]),
           "--features", str(h5), "--jsonl", "--max-new-tokens", str(max_new)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(threads), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    out_lines: "queue.Queue[Optional[str]]" = queue.Queue()
    loaded = threading.Event()
    err_tail: List[str] = []

    def read_out() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out_lines.put(line)
        out_lines.put(None)

    def read_err() -> None:
        assert proc.stderr is not None
        with open(log, "w", encoding="utf-8") as f:
            for line in proc.stderr:
                f.write(line)
                err_tail[:] = (err_tail + [line])[-20:]
                if "conversation cleared" in line:
                    loaded.set()
        loaded.set()  # ended: the wait below sees the exit

    readers = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for t in readers:
        t.start()
    rows: List[Dict[str, Any]] = []
    try:
        assert proc.stdin is not None
        proc.stdin.write("reset\n")  # acknowledged on stderr once the model is loaded and the loop runs
        proc.stdin.flush()
        if not loaded.wait(START_TIMEOUT) or proc.poll() is not None:
            raise SystemExit("slidechat chat did not start:\n" + "".join(err_tail))
        for q in questions:
            t0 = time.perf_counter()
            proc.stdin.write(q + "\n")
            proc.stdin.flush()
            line = out_lines.get(timeout=ANSWER_TIMEOUT)
            dt = time.perf_counter() - t0
            if line is None:
                raise SystemExit("slidechat chat exited:\n" + "".join(err_tail))
            msg = json.loads(line)
            if "answer" not in msg:
                raise SystemExit(f"slidechat chat refused {q!r}: {msg}")
            rows.append({"question": q, "answer": msg["answer"], "answer_s": dt})
        proc.stdin.write("exit\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
    finally:
        stop(proc)
    return rows


def generated_tokens(setup: Dict[str, Any], h5: Path, served: List[Dict[str, Any]], max_new: int,
                     threads: int) -> Dict[str, Optional[int]]:
    """How many tokens each served answer was generated as: the conversation replayed here (same model,
    features, greedy settings); an answer the replay does not reproduce has no count (shown as ?)."""
    import torch

    from slidechat.apps.chat import ChatSession, load_chat_model
    from slidechat.features.io import load_features

    torch.set_num_threads(threads)
    model, tok = load_chat_model(setup["slide_model"])
    feats, coords = load_features(h5)
    chat = ChatSession(model, tok, feats, coords, max_new_tokens=max_new)
    counts: Dict[str, Optional[int]] = {}
    for r in served:
        answer = chat.ask(r["question"])
        counts[r["answer"]] = len(chat.last_answer_ids) if answer == r["answer"] else None
    return counts


# ------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="work_dirs/bench_serve", help="setup and outputs (under work_dirs/)")
    ap.add_argument("--viewers", type=int, default=8, help="concurrent simulated viewers (default 8)")
    ap.add_argument("--max-tiles", type=int, default=60, help="tiles per viewer walk (default 60)")
    ap.add_argument("--min-level-side", type=int, default=256,
                    help="first DeepZoom level of a walk: the first at least this wide (default 256)")
    ap.add_argument("--questions", nargs="+", default=DEFAULT_QUESTIONS, help="chat questions, one session")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and the terminal chat")
    ap.add_argument("--repeats", type=int, default=3,
                    help="conversations per side, alternating serve and terminal (medians reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-tiles", action="store_true")
    ap.add_argument("--skip-chat", action="store_true")
    args = ap.parse_args()

    import httpx

    sys.path.insert(0, str(REPO / "tests"))
    from serve_fixtures import build_serve_setup
    from slidechat.apps.serve.sessions import load_engine

    root = Path(args.root).resolve()
    t0 = time.perf_counter()
    setup = build_serve_setup(root / "setup")
    print(f"setup ready in {time.perf_counter() - t0:.1f} s: {root / 'setup'}", file=sys.stderr)
    max_new = int(inspect.signature(load_engine).parameters["max_new_tokens"].default)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = root / "serve.log"
    server = start_server(setup, port, log, args.threads)
    result: Dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                              "threads": args.threads, "viewers": args.viewers, "max_new_tokens": max_new}
    try:
        with httpx.Client(base_url=base, timeout=TILE_TIMEOUT) as client:
            model = wait_ready(client, server, log)
            result["model_line"] = model["model_line"]
            slides = [s for s in client.get("/api/slides").json() if not s.get("error")]
            chat_slide = next(s["id"] for s in slides if s.get("has_features"))
            if not args.skip_tiles:
                geos = {s["id"]: dzi_geometry(client, s["id"]) for s in slides}
                ids = sorted(geos)
                rng = np.random.default_rng(args.seed)
                walks = [zoom_walk(ids[v % len(ids)], geos[ids[v % len(ids)]], rng, args.min_level_side,
                                   args.max_tiles) for v in range(args.viewers)]
                rows = [tile_row("cold", *run_viewers(base, walks)), tile_row("warm", *run_viewers(base, walks))]
                answers: List[float] = []
                viewers_done = threading.Event()

                def ask_beside() -> None:  # answers back to back until the viewers are through (bounded)
                    with httpx.Client(base_url=base) as c:
                        for k in range(MAX_BESIDE_ANSWERS):
                            if viewers_done.is_set():
                                break
                            q = args.questions[k % len(args.questions)]
                            answers.append(stream_question(c, chat_slide, q, None)["done_s"])

                chat = threading.Thread(target=ask_beside)
                chat.start()
                time.sleep(0.2)  # the first question is in the model's thread when the viewers start
                rows.append(tile_row("warm, chat answering", *run_viewers(base, walks)))
                viewers_done.set()
                chat.join(ANSWER_TIMEOUT)
                rows[-1]["chat_answers_beside"] = len(answers)
                rows[-1]["chat_answer_mean_s"] = float(np.mean(answers)) if answers else None
                result["tiles"] = rows
                result["walk_tiles"] = [len(w) for w in walks]
            if not args.skip_chat:  # serve and terminal in turns, the server idle while the terminal runs
                entry_h5 = Path(setup["h5"]) / f"{chat_slide}.h5"
                result["serve_chat"], result["serve_plain"], result["terminal_chat"] = [], [], []
                for _ in range(args.repeats):
                    session = None
                    for q in args.questions:
                        r = stream_question(client, chat_slide, q, session)
                        session = r["session"]
                        result["serve_chat"].append(r)
                    session = None
                    for q in args.questions:  # the same conversation through POST /api/chat (no stream)
                        t0 = time.perf_counter()
                        resp = client.post("/api/chat", json={"slide": chat_slide, "question": q,
                                                              "session": session}, timeout=ANSWER_TIMEOUT)
                        dt = time.perf_counter() - t0
                        if resp.status_code != 200:
                            raise SystemExit(f"/api/chat answered {resp.status_code}: {resp.text[:300]}")
                        session = resp.json()["session"]
                        result["serve_plain"].append({"question": q, "answer": resp.json()["answer"], "answer_s": dt})
                    result["terminal_chat"] += terminal_chat(setup, entry_h5, args.questions, max_new,
                                                             args.threads, root / "chat.log")
    finally:
        stop(server)
    if not args.skip_chat:
        n_q = len(args.questions)
        counts = generated_tokens(setup, entry_h5, result["serve_chat"][:n_q], max_new, args.threads)
        for r in result["serve_chat"] + result["terminal_chat"]:
            r["tokens"] = counts.get(r["answer"])
        result["answers_identical"] = ([a["answer"] for a in result["serve_chat"]]
                                       == [b["answer"] for b in result["terminal_chat"]]
                                       == [c["answer"] for c in result["serve_plain"]])
    report(result, args)
    from slidechat.utils.atomic import atomic_write_text

    atomic_write_text(root / "serve_latency.json", json.dumps(result, indent=2) + "\n")


def report(result: Dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{result['machine']}; {result['threads']} torch thread(s) per process; "
          f"{result.get('model_line', '')}\n")
    if "tiles" in result:
        print(f"Tiles: {args.viewers} concurrent viewers, <= {args.max_tiles} tiles each (zoom walks), "
              f"DeepZoom JPEG 254+1 px\n")
        print("| pass | requests | errors | p50 ms | p95 ms | max ms | tiles/s |")
        print("|:---|---:|---:|---:|---:|---:|---:|")
        for r in result["tiles"]:
            print(f"| {r['pass']} | {r['requests']} | {r['errors']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                  f"{r['max_ms']:.1f} | {r['tiles_per_s']:.0f} |")
        last = result["tiles"][-1]
        walks = result["walk_tiles"]
        print(f"\nWalks of {min(walks)}-{max(walks)} tiles; viewers on the same slide share its overview "
              f"levels, so some cold requests hit tiles another viewer just made. Beside the last pass "
              f"{last['chat_answers_beside']} chat answer(s) were generated back to back"
              + (f" ({last['chat_answer_mean_s']:.2f} s each on average)." if last["chat_answer_mean_s"] else "."))
    if "serve_chat" in result:
        n_q = len(args.questions)
        print(f"\nChat: {n_q} questions in one conversation, {args.repeats} conversations per side alternating "
              f"serve / terminal, medians per turn; greedy, max_new_tokens {result['max_new_tokens']}, prefix "
              f"reuse; answers identical (stream, /api/chat, terminal): "
              f"{'yes' if result['answers_identical'] else 'NO'}\n")
        print("| turn | tokens | serve: first token s | serve: last token s | serve: done s (+ evidence) | "
              "serve: decode tok/s | serve /api/chat s (+ evidence) | terminal: answer s | serve tok/s | "
              "terminal tok/s |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for k in range(n_q):
            served = result["serve_chat"][k::n_q]
            term = result["terminal_chat"][k::n_q]
            n = served[0]["tokens"]
            first = float(np.median([r["first_s"] for r in served]))
            last = float(np.median([r["last_s"] for r in served]))
            done = float(np.median([r["done_s"] for r in served]))
            answer = float(np.median([r["answer_s"] for r in term]))
            plain = float(np.median([r["answer_s"] for r in result["serve_plain"][k::n_q]]))
            decode = float(np.median([(n - 1) / (r["last_s"] - r["first_s"]) for r in served])) if n else 0.0

            def rate(x: float) -> str:
                return f"{x:.1f}" if n else "?"

            print(f"| {k + 1} | {n if n else '?'} | {first:.3f} | {last:.3f} | {done:.3f} | {rate(decode)} | "
                  f"{plain:.3f} | {answer:.3f} | {rate(n / last if n else 0)} | {rate(n / answer if n else 0)} |")


if __name__ == "__main__":
    main()

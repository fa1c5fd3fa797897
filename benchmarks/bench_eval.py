"""Speed of the SlideBench evaluation library on a synthetic SlideBench-sized table (3,176 rows).

    .venv/bin/python benchmarks/bench_eval.py
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import pandas as pd

from slidechat.data.answers import parse_choice
from slidechat.data.slidebench import SlideBenchWriter, read_slidebench
from slidechat.evaluation.captions import caption_metrics, load_wordnet
from slidechat.evaluation.mcq import score_mcq

N = 3176
WORDS = ("tumor cells nuclei gland stroma invasive ductal carcinoma necrosis mitoses lymphocytes "
         "pleomorphic solid nests acinar pattern grade high low moderately differentiated").split()


def main() -> None:
    rnd = random.Random(0)
    rows = []
    for i in range(N):
        opts = [" ".join(rnd.sample(WORDS, 3)) for _ in range(4)]
        rows.append({"ID": str(i), "Slide": f"S{i % 500}", "Tumor": f"T{i % 31}", "Broad Category": f"B{i % 3}",
                     "Narrow Category": f"N{i % 13}", "Question": "Which finding is present?",
                     "A": opts[0], "B": opts[1], "C": opts[2], "D": opts[3], "Answer": "ABCD"[i % 4]})
    styles = [lambda r: r["Answer"], lambda r: f"The answer is {r['Answer']}.",
              lambda r: f"{r['Answer']}. {r[r['Answer']]}", lambda r: f"I see {r[r['Answer']]} here.",
              lambda r: "A tumor is present but I am not sure."]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.csv"
        pd.DataFrame(rows).to_csv(src, index=False)
        t0 = time.perf_counter()
        table = read_slidebench(src)
        t_read = time.perf_counter() - t0
        out = Path(tmp) / "out.csv"
        t0 = time.perf_counter()
        with SlideBenchWriter(table, out) as w:
            for batch in w.pending_batches(8):
                for it in batch:
                    it.output = styles[it.index % len(styles)](it.row)
                w.write(batch)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        with SlideBenchWriter(table, out) as w:
            assert w.complete
        t_resume = time.perf_counter() - t0
        df = pd.read_csv(out, dtype=str, keep_default_na=False)
        t0 = time.perf_counter()
        rep = score_mcq(df, use_pred=False)
        t_score = time.perf_counter() - t0
    outs = [styles[i % len(styles)](r) for i, r in enumerate(rows)]
    t0 = time.perf_counter()
    for r, o in zip(rows, outs):
        parse_choice(o, {k: r[k] for k in "ABCD"})
    t_parse = time.perf_counter() - t0
    preds = [" ".join(rnd.choices(WORDS, k=40)) for _ in range(200)]
    refs = [" ".join(rnd.choices(WORDS, k=40)) for _ in range(200)]
    t0 = time.perf_counter()
    load_wordnet()
    t_wn = time.perf_counter() - t0
    t0 = time.perf_counter()
    caption_metrics(preds, refs)
    t_cap = time.perf_counter() - t0
    print(f"rows={N}  accuracy={rep.overall['accuracy']:.4f} unparsed={rep.overall['unparsed']}")
    print(f"read CSV                     {t_read * 1e3:8.1f} ms")
    print(f"write (batch 8, fsync each)  {t_write * 1e3:8.1f} ms  ({N / t_write:,.0f} rows/s)")
    print(f"resume check of full output  {t_resume * 1e3:8.1f} ms")
    print(f"parse_choice x{N}           {t_parse * 1e3:8.1f} ms  ({t_parse / N * 1e6:.1f} us/answer)")
    print(f"score_mcq (reparse)          {t_score * 1e3:8.1f} ms")
    print(f"load WordNet (first call)    {t_wn * 1e3:8.1f} ms")
    print(f"caption_metrics 200 x 40 w   {t_cap * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()

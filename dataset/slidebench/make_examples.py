"""Regenerate the example outputs and reports in this folder with the library itself.

    .venv/bin/python dataset/slidebench/make_examples.py

The model answers below are hand-written stand-ins (no model is run); every number in the reports comes
from ``slidechat eval``. Features are tiny random CSVs in a temporary folder; the COAD slide is left
out on purpose so its rows show the ``Error`` column.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from slidechat.cli.main import main
from slidechat.data.slidebench import SlideBenchWriter, read_slidebench
from slidechat.features.io import write_slidechat_csv

HERE = Path(__file__).resolve().parent

ANSWERS = {
    "SlideBench-VQA-TCGA": [
        "B. Invasive ductal carcinoma",
        "The tumor cells form solid nests and tubules.",
        "A",
        "I cannot determine this from the slide.",
        "Yes, the tumor invades the pericolic fat.",  # not used: features missing
        "A",  # not used: features missing
    ],
    "SlideBench-VQA-BCNB": [
        "Answer: A",
        "**B**",
        "C. Three or more (N+(>2))",
        "Grade 2 or Grade 3.",
        "The most likely subtype is Luminal B.",
    ],
    "SlideBench-Caption": [
        "Invasive ductal carcinoma of the breast, moderately differentiated, with solid nests and "
        "tubules in a desmoplastic stroma.",
        "Adenocarcinoma of the lung with an acinar growth pattern and enlarged nuclei.",
        "Adenocarcinoma of the colon invading the muscularis propria.",
        "Renal cell carcinoma, clear cell type, with a delicate vascular network.",
    ],
}


def generate(name: str, feature_root: Path) -> Path:
    table = read_slidebench(HERE / f"{name}.example.csv")
    out = HERE / f"{name}.output.example.csv"
    with SlideBenchWriter(table, out, overwrite=True, feature_root=feature_root) as w:
        for batch in w.pending_batches(2):
            for it in batch:
                if it.ok:
                    it.output = ANSWERS[name][it.index]
                else:  # keep the report free of this machine's temporary path
                    it.error = it.error.replace(str(feature_root), "<feature_root>")
            w.write(batch)
    return out


def main_() -> None:
    os.chdir(HERE)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for tumor, slide in [("BRCA", "TCGA-EX-0001-01Z-00-DX1"), ("LUAD", "TCGA-EX-0002-01Z-00-DX1"),
                             ("KIRC", "TCGA-EX-0004-01Z-00-DX1")]:
            write_slidechat_csv(root / tumor / f"{slide}.csv", rng.random((3, 4), dtype=np.float32))
        for pid in ["101", "205", "318", "412"]:
            write_slidechat_csv(root / f"{pid}.csv", rng.random((3, 4), dtype=np.float32))
        outs = {n: generate(n, root) for n in ANSWERS}
    for name in ("SlideBench-VQA-TCGA", "SlideBench-VQA-BCNB"):
        o = outs[name].name
        main(["eval", "mcq", o, "--out-json", f"{name}.report.example.json",
              "--out-md", f"{name}.report.example.md"])
    o = outs["SlideBench-Caption"].name
    main(["eval", "caption", o, "--ref-column", "Caption", "--out-json",
          "SlideBench-Caption.report.example.json", "--out-md", "SlideBench-Caption.report.example.md"])


if __name__ == "__main__":
    main_()

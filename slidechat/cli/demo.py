"""``slidechat demo``: the main job end to end on the embedded default, on CPU.

Slide path: synthetic slides -> feature extraction (tiny encoder) -> tiny offline LLM -> instruction
data -> ``xtuner train`` stage 1 -> stage 2 -> SlideBench-style test -> accuracy table.
Cytology path: synthetic fields of view -> LLaMA-Factory datasets -> tiny offline Qwen2-VL ->
``xtuner train`` (full fine-tune) -> export to a plain Hugging Face folder -> ``slidechat infer`` ->
``slidechat eval cytology`` scores -> ``slidechat screen`` on held-out synthetic cytology slides -> AUC.
Every step is skipped when its output already exists, so an interrupted demo continues where it stopped.

The terminal shows one line per step and, at the end, a short summary (the headline figures read from
the files the steps wrote, where the pictures are, the next commands to try); everything the steps
print (mmengine's training logs, progress bars, ``xtuner train``'s own output) goes to
``<work-dir>/demo.log`` (``--show-output``: to the terminal instead). The stage-2 slide model is
exported to ``<work-dir>/export`` so ``slidechat chat --checkpoint <work-dir>/export`` works at once.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional

from slidechat.cli.main import main as cli_main
from slidechat.utils.atomic import atomic_write_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="[slides, cytology] run the whole pipeline on synthetic data and tiny "
                                     "models (CPU)",
                       description=__doc__)
    p.add_argument("--work-dir", default="work_dirs/demo", help="where everything is written")
    p.add_argument("--n-slides", type=int, default=24,
                   help="number of synthetic slides (every third is held out for the test)")
    p.add_argument("--n-fields", type=int, default=800,
                   help="number of synthetic 224-px cytology fields of view (10%% held out for inference)")
    p.add_argument("--n-cyto-slides", type=int, default=8,
                   help="held-out synthetic cytology slides screened at the end (half abnormal)")
    p.add_argument("--part", choices=["all", "slide", "cytology"], default="all",
                   help="run both paths (default) or only one")
    p.add_argument("--fresh", action="store_true", help="delete the work dir first and start over")
    p.add_argument("--show-output", action="store_true",
                   help="print the steps' full output (training logs, progress bars) on the terminal "
                        "instead of <work-dir>/demo.log")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------------------------
# one line per step on the terminal, the rest in the log


class Steps:
    """Prints one line per step on the terminal and sends everything the step prints (our logging,
    mmengine, progress bars, subprocesses such as ``xtuner train``) to ``log_path``.

    The redirection is of file descriptors 1 and 2, not of ``sys.stdout``: mmengine's and tqdm's
    handlers hold the stream objects they were created with, and subprocesses inherit descriptors.
    """

    def __init__(self, log_path: Path, show_output: bool = False) -> None:
        self.log_path = log_path
        self.show_output = show_output
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        # the terminal, kept before any redirection (a duplicate of descriptor 1)
        self.term: IO[str] = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        self.t_start = time.perf_counter()

    def say(self, text: str) -> None:
        self.term.write(text)
        self.term.flush()

    def note(self, text: str) -> None:
        """A step's own output (a table, a figure): where everything the step prints goes."""
        print(text)

    @contextlib.contextmanager
    def _redirected(self) -> Iterator[None]:
        if self.show_output:
            yield
            return
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(self.log_path, "a", encoding="utf-8") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])

    @contextlib.contextmanager
    def step(self, label: str, done: bool = False) -> Iterator[None]:
        """``label ... done (12 s)``; ``done``: the step's output exists already (it is skipped)."""
        self.say(f"{label} ... ")
        if self.show_output:
            self.say("\n")
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {label}\n")
        t0 = time.perf_counter()
        try:
            with self._redirected():
                yield
        except BaseException:
            self.say(f"FAILED after {time.perf_counter() - t0:.0f} s\n{self.tail()}"
                     f"(full output: {self.log_path})\n")
            raise
        self.say("already done\n" if done else f"done ({time.perf_counter() - t0:.0f} s)\n")

    def tail(self, n: int = 15) -> str:
        if self.show_output or not self.log_path.is_file():
            return ""
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
        return "".join(f"  | {x}\n" for x in lines)

    def close(self) -> None:
        self.term.close()


def run(args: argparse.Namespace) -> int:
    # lazy: apps.demo imports torch, transformers and mmengine; `slidechat --help` must not wait for them
    from slidechat.apps.demo import run_cytology_demo, run_slide_demo

    root = Path(args.work_dir)
    if args.fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    steps = Steps(root / "demo.log", show_output=args.show_output)
    try:
        if not args.show_output:
            steps.say(f"slidechat demo: one line per step; the steps' full output goes to {steps.log_path}\n")
        if args.part in ("all", "slide"):
            run_slide_demo(root, args.n_slides, steps, cli_main)
        if args.part in ("all", "cytology"):
            run_cytology_demo(root, args.n_fields, args.n_cyto_slides, steps, cli_main)
        block = summary_block(root, log_path=None if args.show_output else steps.log_path,
                              minutes=(time.perf_counter() - steps.t_start) / 60)
        atomic_write_text(root / "summary.txt", block)
        steps.say("\n" + block)
    finally:
        steps.close()
    return 0


# ----------------------------------------------------------------------------------------------
# the summary block


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pct(correct: Any, n: Any) -> str:
    try:
        c, k = int(correct), int(n)
    except (TypeError, ValueError):
        return "n/a"
    return f"{100.0 * c / k:.1f} % ({c}/{k})" if k else "n/a (0 rows)"


def _slide_line(report: Optional[Dict[str, Any]]) -> str:
    overall = ((report or {}).get("mcq") or {}).get("overall") or {}
    if not overall:
        return "not run"
    return f"{_pct(overall.get('correct'), overall.get('n'))}"


def _cytology_lines(scores: Optional[Dict[str, Any]]) -> List[str]:
    mcq = (((scores or {}).get("scorers") or {}).get("mcq")) or {}
    overall = mcq.get("overall") or {}
    if not overall:
        return [_figure("cytology fields, multiple choice", "not run")]
    lines = [_figure("cytology fields, all questions", _pct(overall.get("correct"), overall.get("n")))]
    for g in (mcq.get("groups") or {}).get("task") or []:
        lines.append(_figure(f"  {g.get('value')}", _pct(g.get("correct"), g.get("n"))))
    return lines


def _figure(label: str, value: str) -> str:
    """``  label ....... value``: one aligned line of the summary (long labels keep two spaces)."""
    return f"  {label:<40} {value}" if len(label) <= 40 else f"  {label}  {value}"


def _screen_line(metrics: Optional[Dict[str, Any]]) -> str:
    m = metrics or {}
    try:
        auc, lo, hi = float(m["auc"]), float(m["auc_ci_low"]), float(m["auc_ci_high"])
    except (KeyError, TypeError, ValueError):
        return "not run"
    if any(math.isnan(v) for v in (auc, lo, hi)):
        return "n/a"
    n = m.get("n_slides")
    return f"AUC {auc:.3f} (95% CI {lo:.3f}-{hi:.3f}) over {n} slides ({m.get('n_abnormal')} abnormal)"


def _first(folder: Path, pattern: str) -> Optional[Path]:
    found = sorted(folder.glob(pattern)) if folder.is_dir() else []
    return found[0] if found else None


def _held_out_feature(root: Path, paths: Dict[str, Path]) -> Optional[Path]:
    """A held-out slide's feature file (the first slide of the test CSV), for the chat example."""
    test_csv = root / "data" / "test_vqa.csv"
    try:
        with open(test_csv, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                sid = (row.get("Slide") or row.get("slide") or "").strip()
                if sid and (paths["h5"] / f"{sid}.h5").is_file():
                    return paths["h5"] / f"{sid}.h5"
    except OSError:
        pass
    return _first(paths["h5"], "*.h5")


def summary_block(root: Path, log_path: Optional[Path] = None, minutes: Optional[float] = None) -> str:
    """The demo's closing block: headline figures read from the files the steps wrote (a step not run
    says so), where the pictures are, and the next three commands (two chats on the demo's own models)."""
    # lazy: apps.demo imports torch, transformers and mmengine; `slidechat --help` must not wait for them
    from slidechat.apps.demo import demo_paths, exported

    paths = demo_paths(root)
    slide = _slide_line(_read_json(paths["slide_report"]))
    lines = ["=" * 78,
             "slidechat demo: summary" + (f" ({minutes:.1f} min)" if minutes is not None else ""),
             "=" * 78,
             "Headline figures (tiny models on synthetic data: they show the pipeline works, not a benchmark)",
             _figure("slides, held-out VQA accuracy", slide),
             *_cytology_lines(_read_json(paths["cyto_scores"])),
             _figure("cytology slides, screening", _screen_line(_read_json(paths["screen_metrics"]))),
             "",
             "Pictures"]
    pictures = [("QC (tissue, patches, scale bar)", paths["qc"], "*.png"),
                ("screening ROC curve", paths["screen"] / "roc.png", None),
                ("screening heatmaps", paths["screen"] / "heatmaps", "*.png"),
                ("screening galleries (top fields)", paths["screen"] / "galleries", "*.png")]
    for label, where, pattern in pictures:
        if pattern is None:
            state = str(where) if where.is_file() else "not made"
        else:
            n = len(list(where.glob(pattern))) if where.is_dir() else 0
            state = f"{where}/ ({n} PNG)" if n else "not made"
        lines.append(_figure(label, state))
    reports = [str(p) for p in (Path(str(paths["slide_test"]) + ".report.md"),
                                paths["cyto_scores"].with_suffix(".md"), paths["screen"] / "reports")
               if p.exists()]
    lines += ["", f"Reports: {', '.join(reports) or 'none yet'}"]
    if log_path is not None:
        lines.append(f"Full output of every step: {log_path}")
    lines += ["", "Next, try"]
    feat = _held_out_feature(root, paths)
    if exported(paths["export"]) and feat is not None:
        lines.append(f"  slidechat chat --checkpoint {paths['export']} --features {feat}")
    field = _first(paths["fields"] / "images" / "test", "*.png")
    if (paths["cyto_model"] / "config.json").is_file() and field is not None:
        lines.append(f"  slidechat chat --model_name_or_path {paths['cyto_model']} --image {field}")
    if exported(paths["export"]) and paths["h5"].is_dir():  # the browser app on the demo's own outputs
        lines.append(f"  slidechat serve --slides {paths['slides']} --features {paths['features']} "
                     f"--checkpoint {paths['export']}")
    if (paths["cyto_model"] / "config.json").is_file() and paths["cyto_slide_files"].is_dir():
        lines.append(f"  slidechat serve --slides {paths['cyto_slide_files']} --screening {paths['screen']} "
                     f"--model_name_or_path {paths['cyto_model']}")
    lines.append("  slidechat extract-features YOUR_SLIDES/ --out work_dirs/features   "
                 "(then: docs/ for training and testing)")
    lines.append("=" * 78)
    return "\n".join(lines) + "\n"

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
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional

from slidechat.utils.atomic import atomic_write_text
from slidechat.utils.errors import SlideChatError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
#: image_max_pixels of configs/tiny/cytochat_sft.py (224x224): inference and screening must match it
TINY_IMAGE_MAX_PIXELS = 224 * 224


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


def _config(name: str) -> Path:
    path = REPO_ROOT / "configs" / "tiny" / name
    if not path.is_file():
        raise SlideChatError("demo config not found (run the demo from a source checkout)", path)
    return path


def _xtuner_train(config: Path, work_dir: Path, overrides: List[str]) -> None:
    """Run the stock ``xtuner train`` entry point, exactly as a user would."""
    bin_dir = Path(sys.executable).parent
    xtuner = bin_dir / "xtuner"
    if not xtuner.exists():
        xtuner = Path(shutil.which("xtuner") or "xtuner")
    env = dict(os.environ)
    # xtuner's launcher re-executes a bare `python`: make it this environment's interpreter.
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    cmd = [str(xtuner), "train", str(config), "--work-dir", str(work_dir), "--seed", "0"]
    if overrides:
        cmd += ["--cfg-options", *overrides]
    logger.info("$ %s", " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    res = subprocess.run(cmd, env=env)  # its output goes where ours goes (the demo log)
    # xtuner's launcher returns 0 even when training failed: judge by the checkpoint it must leave
    if res.returncode != 0 or not _trained(work_dir):
        raise SlideChatError(f"xtuner train did not finish (exit code {res.returncode}, no "
                             f"last_checkpoint; see the log under {work_dir})", config)


def _trained(work_dir: Path) -> bool:
    return (work_dir / "last_checkpoint").is_file()


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
    root = Path(args.work_dir)
    if args.fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    steps = Steps(root / "demo.log", show_output=args.show_output)
    try:
        if not args.show_output:
            steps.say(f"slidechat demo: one line per step; the steps' full output goes to {steps.log_path}\n")
        if args.part in ("all", "slide"):
            run_slide_demo(root, args.n_slides, steps)
        if args.part in ("all", "cytology"):
            run_cytology_demo(root, args.n_fields, args.n_cyto_slides, steps)
        block = summary_block(root, log_path=None if args.show_output else steps.log_path,
                              minutes=(time.perf_counter() - steps.t_start) / 60)
        atomic_write_text(root / "summary.txt", block)
        steps.say("\n" + block)
    finally:
        steps.close()
    return 0


def run_slide_demo(root: Path, n_slides: int, steps: Optional[Steps] = None) -> None:
    """Whole slides: synthetic WSIs -> features -> stage 1 -> stage 2 -> SlideBench test -> export."""
    from slidechat.cli.main import main as cli_main
    from slidechat.data.synthetic import FEATURE_TEMPLATE, write_synthetic_dataset
    from slidechat.engine.overrides import parse_cfg_options, path_overrides
    from slidechat.apps.test import TestOptions, run_test
    from slidechat.apps.extract import extract_slides
    from slidechat.model.checkpoint import resolve_checkpoint
    from slidechat.model.tiny_llm import make_tiny_llm
    from slidechat.wsi.synthetic import make_demo_slides

    steps = steps or Steps(root / "demo.log", show_output=True)
    paths = demo_paths(root)
    slides_dir, feat_dir = root / "slides", root / "features"
    llm_dir, data_dir = root / "tiny_llm", root / "data"
    stage1, stage2, export_dir = root / "stage1", root / "stage2", paths["export"]
    manifest = slides_dir / "manifest.csv"

    with steps.step("[slide 1/8] synthetic slides", done=manifest.is_file()):
        if not manifest.is_file():
            manifest = make_demo_slides(slides_dir, n_slides=n_slides, seed=0)
    import pandas as pd

    slide_paths = pd.read_csv(manifest)["path"].tolist()

    with steps.step("[slide 2/8] feature extraction (tiny_test encoder, 20x, 224 px, QC pictures)"):
        summary = extract_slides(slide_paths, feat_dir, encoder="tiny_test", save_csv=True, save_qc=True)
        if summary.get("failed"):
            raise SlideChatError(f"{len(summary['failed'])} slide(s) failed; see failures.csv", feat_dir)

    with steps.step("[slide 3/8] tiny offline LLM + tokenizer", done=(llm_dir / "config.json").is_file()):
        if not (llm_dir / "config.json").is_file():
            make_tiny_llm(llm_dir)

    with steps.step("[slide 4/8] instruction data (training slides) and test CSV (held-out slides)"):
        data = write_synthetic_dataset(manifest, data_dir, seed=0, holdout_every=3, mcq_variants=4)

    h5_root = feat_dir / "h5_files"
    common = dict(llm_name_or_path=llm_dir, feature_root=h5_root)
    with steps.step("[slide 5/8] stage 1 (alignment: slide encoder + projector, LLM frozen; xtuner train)",
                    done=_trained(stage1)):
        if not _trained(stage1):
            _xtuner_train(_config("stage_1.py"), stage1,
                          path_overrides(data_path=data["stage1"], **common))
    with steps.step("[slide 6/8] stage 2 (instruction tuning: everything trained; xtuner train)",
                    done=_trained(stage2)):
        if not _trained(stage2):
            _xtuner_train(_config("stage_2.py"), stage2,
                          path_overrides(data_path=data["stage2"], pretrained_pth=stage1, **common))

    out_csv = paths["slide_test"]
    with steps.step("[slide 7/8] SlideBench-style test on the held-out slides + scoring"):
        report = run_test(TestOptions(config=_config("stage_2.py"), checkpoint=resolve_checkpoint(stage2),
                                      test_slide_csv=data["test_vqa"], test_output_csv=out_csv,
                                      feature_root=h5_root, feature_template=FEATURE_TEMPLATE, batch_size=8,
                                      cfg_options=parse_cfg_options(path_overrides(**common))))
        print("\n" + _report_markdown(report, out_csv))

    exported = _exported(export_dir)
    with steps.step(f"[slide 8/8] export the stage-2 model for chat (slidechat export -> {export_dir})",
                    done=exported):
        if not exported:
            rc = cli_main(["export", str(_config("stage_2.py")), "--checkpoint", str(stage2),
                           "--out", str(export_dir), "--cfg-options", *path_overrides(**common)])
            if rc != 0:
                raise SlideChatError(f"slidechat export failed (exit code {rc})", export_dir)


def _report_markdown(report: object, out_csv: Path) -> str:
    if hasattr(report, "to_markdown"):
        return report.to_markdown()
    md = Path(str(out_csv) + ".report.md")
    if md.is_file():
        return md.read_text()
    from slidechat.evaluation.mcq import score_mcq
    from slidechat.data.slidebench import read_output

    return score_mcq(read_output(out_csv)).to_markdown()


def run_cytology_demo(root: Path, n_fields: int, n_cyto_slides: int,
                      steps: Optional[Steps] = None) -> Dict[str, Any]:
    """Cytology fields of view: synthetic fields -> tiny Qwen2-VL trained with ``xtuner train`` ->
    export -> ``slidechat infer`` -> cytology scores -> slide screening with AUC.

    The tiny model is taught the screening question only (``configs/tiny/cytochat_screen.py``: the
    other tasks would need far more CPU time than a demo has); inference and scoring run on the
    held-out screening and multiple-choice fields, so the report shows a taught task beside tasks the
    model never saw (it answers those like the screening question: option A or B, whatever the options).
    """
    from slidechat.cli.main import main as cli_main
    from slidechat.data.synthetic_cytology import write_fields_dataset
    from slidechat.apps.screening import run_screen_demo
    from slidechat.engine.qwen2vl_train import export_qwen2vl
    from slidechat.model.checkpoint import resolve_checkpoint
    from slidechat.model.tiny_qwen2vl import make_tiny_qwen2vl

    steps = steps or Steps(root / "demo.log", show_output=True)
    paths = demo_paths(root)
    fields_dir, vlm_dir = paths["fields"], root / "tiny_qwen2vl"
    sft_dir, hf_dir = root / "cytochat_screen", paths["cyto_model"]
    preds, scores_dir = paths["cyto_preds"], paths["cyto_scores"].parent
    config = _config("cytochat_screen.py")

    with steps.step("[cytology 1/7] synthetic fields of view + LLaMA-Factory datasets",
                    done=(fields_dir / "dataset_info.json").is_file()):
        if not (fields_dir / "dataset_info.json").is_file():
            write_fields_dataset(fields_dir, n_fields=n_fields, seed=0, size=224, test_fraction=0.1)

    with steps.step("[cytology 2/7] tiny offline Qwen2-VL + processor", done=(vlm_dir / "config.json").is_file()):
        if not (vlm_dir / "config.json").is_file():
            make_tiny_qwen2vl(vlm_dir)

    with steps.step(f"[cytology 3/7] fine-tune (vision tower included; xtuner train {config.name})",
                    done=_trained(sft_dir)):
        if not _trained(sft_dir):
            _xtuner_train(config, sft_dir, [
                f"model.model_name_or_path={vlm_dir}", f"train_dataloader.dataset.processor={vlm_dir}",
                f"train_dataloader.dataset.dataset_dir={fields_dir}"])

    with steps.step("[cytology 4/7] export to a plain Hugging Face folder",
                    done=(hf_dir / "config.json").is_file()):
        if not (hf_dir / "config.json").is_file():
            if hf_dir.exists():  # the demo's own folder, left half-written by an interrupted run
                shutil.rmtree(hf_dir)
            export_qwen2vl(config, resolve_checkpoint(sft_dir), hf_dir, cfg_options={
                "model.model_name_or_path": str(vlm_dir), "train_dataloader.dataset.processor": str(vlm_dir),
                "train_dataloader.dataset.dataset_dir": str(fields_dir)})

    with steps.step("[cytology 5/7] slidechat infer on the held-out fields (screening + MCQ, greedy)"):
        rc = cli_main(["infer", "--model_name_or_path", str(hf_dir), "--dataset",
                       "cyto_screening_test,cyto_mcq_test",
                       "--dataset_dir", str(fields_dir), "--template", "qwen2_vl", "--save_name", str(preds),
                       "--temperature", "0", "--max_new_tokens", "16", "--batch_size", "8",
                       "--image_max_pixels", str(TINY_IMAGE_MAX_PIXELS), "--seed", "0", "--no_progress"])
        if rc != 0:
            raise SlideChatError(f"slidechat infer failed (exit code {rc})", preds)

    with steps.step("[cytology 6/7] scores (slidechat eval cytology)"):
        rc = cli_main(["eval", "cytology", str(preds), "--out", str(scores_dir)])
        if rc != 0:
            raise SlideChatError(f"slidechat eval cytology failed (exit code {rc})", preds)

    with steps.step(f"[cytology 7/7] slidechat screen on {n_cyto_slides} held-out synthetic cytology slides "
                    f"(ROC, heatmaps, galleries)"):
        summary = run_screen_demo(root, hf_dir, n_slides=n_cyto_slides,
                                  image_max_pixels=TINY_IMAGE_MAX_PIXELS)
        print(f"\nSlide-level screening ({n_cyto_slides} held-out synthetic slides): "
              f"{summary.get('metrics_line')}")
    return summary


# ----------------------------------------------------------------------------------------------
# the summary block


def demo_paths(root: Path) -> Dict[str, Path]:
    """Where the demo's steps write what the summary reads (one place for both)."""
    return {
        "slide_test": root / "test" / "test_vqa_output.csv",
        "slide_report": root / "test" / "test_vqa_output.csv.report.json",
        "export": root / "export",
        "h5": root / "features" / "h5_files",
        "qc": root / "features" / "qc",
        "fields": root / "cytology",
        "cyto_model": root / "cytochat_screen_hf",
        "cyto_preds": root / "cytology_infer" / "generated_predictions.jsonl",
        "cyto_scores": root / "cytology_scores" / "generated_predictions.cytology.json",
        "screen": root / "screen",
        "screen_metrics": root / "screen" / "metrics.json",
        "cyto_slides": root / "cyto_slides",
    }


def _exported(folder: Path) -> bool:
    """Whether ``folder`` holds a slide-model export (the file ``SlideChatModel.from_pretrained`` reads)."""
    from slidechat.model.checkpoint import EXPORTED_CONFIG_FILE  # here: that module imports torch

    return (folder / EXPORTED_CONFIG_FILE).is_file()


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
    import csv

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
    if _exported(paths["export"]) and feat is not None:
        lines.append(f"  slidechat chat --checkpoint {paths['export']} --features {feat}")
    field = _first(paths["fields"] / "images" / "test", "*.png")
    if (paths["cyto_model"] / "config.json").is_file() and field is not None:
        lines.append(f"  slidechat chat --model_name_or_path {paths['cyto_model']} --image {field}")
    lines.append("  slidechat extract-features YOUR_SLIDES/ --out work_dirs/features   "
                 "(then: docs/ for training and testing)")
    lines.append("=" * 78)
    return "\n".join(lines) + "\n"

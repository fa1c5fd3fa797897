"""The demo's work: both paths of the main job end to end on synthetic data and tiny models, on CPU.

Slide path: synthetic slides -> feature extraction (tiny encoder) -> tiny offline LLM -> instruction
data -> ``xtuner train`` stage 1 -> stage 2 -> SlideBench-style test -> export for chat.
Cytology path: synthetic fields of view -> LLaMA-Factory datasets -> tiny offline Qwen2-VL ->
``xtuner train`` (full fine-tune) -> export to a plain Hugging Face folder -> ``slidechat infer`` ->
``slidechat eval cytology`` scores -> ``slidechat screen`` on held-out synthetic cytology slides -> AUC.
Every step is skipped when its output already exists, so an interrupted demo continues where it stopped.

How the steps are shown (one line each, their output in a log) is the caller's: it passes a
:class:`StepReporter`. The commands a user would type (``slidechat export``, ``infer``, ``eval``) run
through the caller's ``command_line`` (``slidechat.cli.main.main``), exactly as typed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Protocol, Sequence

import pandas as pd

from slidechat.apps.extract import extract_slides
from slidechat.apps.screening import run_screen_demo
from slidechat.apps.test import TestOptions, run_test
from slidechat.data.slidebench import read_output
from slidechat.data.synthetic import FEATURE_TEMPLATE, write_synthetic_dataset
from slidechat.data.synthetic_cytology import write_fields_dataset
from slidechat.engine.overrides import parse_cfg_options, path_overrides
from slidechat.engine.qwen2vl_train import export_qwen2vl
from slidechat.evaluation.mcq import score_mcq
from slidechat.model.checkpoint import EXPORTED_CONFIG_FILE, resolve_checkpoint
from slidechat.model.tiny_llm import make_tiny_llm
from slidechat.model.tiny_qwen2vl import make_tiny_qwen2vl
from slidechat.utils.errors import SlideChatError
from slidechat.wsi.synthetic import make_demo_slides

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
#: image_max_pixels of configs/tiny/cytochat_sft.py (224x224): inference and screening must match it
TINY_IMAGE_MAX_PIXELS = 224 * 224

#: slidechat's own command line (``slidechat.cli.main.main``): arguments -> exit code
CommandLine = Callable[[Sequence[str]], int]


class StepReporter(Protocol):
    """Shows one step: ``with steps.step("label", done=...)`` around its work, ``note`` for its output."""

    def step(self, label: str, done: bool = False) -> ContextManager[None]: ...

    def note(self, text: str) -> None: ...


def demo_paths(root: Path) -> Dict[str, Path]:
    """Where the demo's steps write what the summary reads (one place for both)."""
    return {
        "slide_test": root / "test" / "test_vqa_output.csv",
        "slide_report": root / "test" / "test_vqa_output.csv.report.json",
        "export": root / "export",
        "slides": root / "slides" / "slides",
        "features": root / "features",
        "h5": root / "features" / "h5_files",
        "qc": root / "features" / "qc",
        "fields": root / "cytology",
        "cyto_model": root / "cytochat_screen_hf",
        "cyto_preds": root / "cytology_infer" / "generated_predictions.jsonl",
        "cyto_scores": root / "cytology_scores" / "generated_predictions.cytology.json",
        "screen": root / "screen",
        "screen_metrics": root / "screen" / "metrics.json",
        "cyto_slides": root / "cyto_slides",
        "cyto_slide_files": root / "cyto_slides" / "slides",
    }


def demo_config(name: str) -> Path:
    """``configs/tiny/<name>`` of this source checkout (the demo's training recipes)."""
    path = REPO_ROOT / "configs" / "tiny" / name
    if not path.is_file():
        raise SlideChatError("demo config not found (run the demo from a source checkout)", path)
    return path


def trained(work_dir: Path) -> bool:
    """Whether ``xtuner train`` finished in ``work_dir`` (it leaves ``last_checkpoint``)."""
    return (work_dir / "last_checkpoint").is_file()


def exported(folder: Path) -> bool:
    """Whether ``folder`` holds a slide-model export (the file ``SlideChatModel.from_pretrained`` reads)."""
    return (folder / EXPORTED_CONFIG_FILE).is_file()


def xtuner_train(config: Path, work_dir: Path, overrides: List[str]) -> None:
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
    if res.returncode != 0 or not trained(work_dir):
        raise SlideChatError(f"xtuner train did not finish (exit code {res.returncode}, no "
                             f"last_checkpoint; see the log under {work_dir})", config)


# ----------------------------------------------------------------------------------------------
# whole slides


def run_slide_demo(root: Path, n_slides: int, steps: StepReporter, command_line: CommandLine) -> None:
    """Whole slides: synthetic WSIs -> features -> stage 1 -> stage 2 -> SlideBench test -> export."""
    data = _slide_data(root, n_slides, steps)
    common = dict(llm_name_or_path=root / "tiny_llm", feature_root=demo_paths(root)["h5"])
    _train_slide_model(root, data, common, steps)
    _test_and_export(root, data, common, steps, command_line)


def _slide_data(root: Path, n_slides: int, steps: StepReporter) -> Dict[str, Path]:
    """Steps 1-4: synthetic slides, their features, the tiny LLM, the instruction and test data."""
    slides_dir, feat_dir = root / "slides", root / "features"
    llm_dir, data_dir = root / "tiny_llm", root / "data"
    manifest = slides_dir / "manifest.csv"

    with steps.step("[slide 1/8] synthetic slides", done=manifest.is_file()):
        if not manifest.is_file():
            manifest = make_demo_slides(slides_dir, n_slides=n_slides, seed=0)
    slide_paths = pd.read_csv(manifest)["path"].tolist()

    with steps.step("[slide 2/8] feature extraction (tiny_test encoder, 20x, 224 px, QC pictures)"):
        # readers and encoder threads fixed, not balanced by timing: CPU matmuls round differently with
        # the thread count, and the tiny models turn 1e-7 feature differences into different answers
        summary = extract_slides(slide_paths, feat_dir, encoder="tiny_test", save_csv=True, save_qc=True,
                                 num_workers=0)
        if summary.get("failed"):
            raise SlideChatError(f"{len(summary['failed'])} slide(s) failed; see failures.csv", feat_dir)

    with steps.step("[slide 3/8] tiny offline LLM + tokenizer", done=(llm_dir / "config.json").is_file()):
        if not (llm_dir / "config.json").is_file():
            make_tiny_llm(llm_dir)

    with steps.step("[slide 4/8] instruction data (training slides) and test CSV (held-out slides)"):
        return write_synthetic_dataset(manifest, data_dir, seed=0, holdout_every=3, mcq_variants=4)


def _train_slide_model(root: Path, data: Dict[str, Path], common: Dict[str, Any], steps: StepReporter) -> None:
    """Steps 5-6: ``xtuner train`` stage 1, then stage 2 from it."""
    stage1, stage2 = root / "stage1", root / "stage2"
    with steps.step("[slide 5/8] stage 1 (alignment: slide encoder + projector, LLM frozen; xtuner train)",
                    done=trained(stage1)):
        if not trained(stage1):
            xtuner_train(demo_config("stage_1.py"), stage1, path_overrides(data_path=data["stage1"], **common))
    with steps.step("[slide 6/8] stage 2 (instruction tuning: everything trained; xtuner train)",
                    done=trained(stage2)):
        if not trained(stage2):
            xtuner_train(demo_config("stage_2.py"), stage2,
                         path_overrides(data_path=data["stage2"], pretrained_pth=stage1, **common))


def _test_and_export(root: Path, data: Dict[str, Path], common: Dict[str, Any], steps: StepReporter,
                     command_line: CommandLine) -> None:
    """Steps 7-8: the SlideBench-style test of stage 2 on the held-out slides, and its export for chat."""
    paths = demo_paths(root)
    stage2, export_dir, out_csv = root / "stage2", paths["export"], paths["slide_test"]
    with steps.step("[slide 7/8] SlideBench-style test on the held-out slides + scoring"):
        report = run_test(TestOptions(config=demo_config("stage_2.py"), checkpoint=resolve_checkpoint(stage2),
                                      test_slide_csv=data["test_vqa"], test_output_csv=out_csv,
                                      feature_root=common["feature_root"], feature_template=FEATURE_TEMPLATE,
                                      batch_size=8, cfg_options=parse_cfg_options(path_overrides(**common))))
        steps.note("\n" + _report_markdown(report, out_csv))

    done = exported(export_dir)
    with steps.step(f"[slide 8/8] export the stage-2 model for chat (slidechat export -> {export_dir})",
                    done=done):
        if not done:
            rc = command_line(["export", str(demo_config("stage_2.py")), "--checkpoint", str(stage2),
                               "--out", str(export_dir), "--cfg-options", *path_overrides(**common)])
            if rc != 0:
                raise SlideChatError(f"slidechat export failed (exit code {rc})", export_dir)


def _report_markdown(report: object, out_csv: Path) -> str:
    if hasattr(report, "to_markdown"):
        return report.to_markdown()
    md = Path(str(out_csv) + ".report.md")
    if md.is_file():
        return md.read_text()
    return score_mcq(read_output(out_csv)).to_markdown()


# ----------------------------------------------------------------------------------------------
# cytology


def run_cytology_demo(root: Path, n_fields: int, n_cyto_slides: int, steps: StepReporter,
                      command_line: CommandLine) -> Dict[str, Any]:
    """Cytology fields of view: synthetic fields -> tiny Qwen2-VL trained with ``xtuner train`` ->
    export -> ``slidechat infer`` -> cytology scores -> slide screening with AUC.

    The tiny model is taught the screening question only (``configs/tiny/cytochat_screen.py``: the
    other tasks would need far more CPU time than a demo has); inference and scoring run on the
    held-out screening and multiple-choice fields, so the report shows a taught task beside tasks the
    model never saw (it answers those like the screening question: option A or B, whatever the options).
    """
    hf_dir = _cytology_model(root, n_fields, steps)
    _cytology_scores(root, hf_dir, steps, command_line)
    with steps.step(f"[cytology 7/7] slidechat screen on {n_cyto_slides} held-out synthetic cytology slides "
                    f"(ROC, heatmaps, galleries)"):
        summary = run_screen_demo(root, hf_dir, n_slides=n_cyto_slides,
                                  image_max_pixels=TINY_IMAGE_MAX_PIXELS)
        steps.note(f"\nSlide-level screening ({n_cyto_slides} held-out synthetic slides): "
                   f"{summary.get('metrics_line')}")
    return summary


def _cytology_model(root: Path, n_fields: int, steps: StepReporter) -> Path:
    """Steps 1-4: synthetic fields, the tiny Qwen2-VL, its fine-tune, its export; the exported folder."""
    paths = demo_paths(root)
    fields_dir, vlm_dir = paths["fields"], root / "tiny_qwen2vl"
    sft_dir, hf_dir = root / "cytochat_screen", paths["cyto_model"]
    config = demo_config("cytochat_screen.py")

    with steps.step("[cytology 1/7] synthetic fields of view + LLaMA-Factory datasets",
                    done=(fields_dir / "dataset_info.json").is_file()):
        if not (fields_dir / "dataset_info.json").is_file():
            write_fields_dataset(fields_dir, n_fields=n_fields, seed=0, size=224, test_fraction=0.1)

    with steps.step("[cytology 2/7] tiny offline Qwen2-VL + processor", done=(vlm_dir / "config.json").is_file()):
        if not (vlm_dir / "config.json").is_file():
            make_tiny_qwen2vl(vlm_dir)

    with steps.step(f"[cytology 3/7] fine-tune (vision tower included; xtuner train {config.name})",
                    done=trained(sft_dir)):
        if not trained(sft_dir):
            xtuner_train(config, sft_dir, [
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
    return hf_dir


def _cytology_scores(root: Path, hf_dir: Path, steps: StepReporter, command_line: CommandLine) -> None:
    """Steps 5-6: ``slidechat infer`` on the held-out fields, then ``slidechat eval cytology``."""
    paths = demo_paths(root)
    preds, scores_dir = paths["cyto_preds"], paths["cyto_scores"].parent
    with steps.step("[cytology 5/7] slidechat infer on the held-out fields (screening + MCQ, greedy)"):
        rc = command_line(["infer", "--model_name_or_path", str(hf_dir), "--dataset",
                           "cyto_screening_test,cyto_mcq_test",
                           "--dataset_dir", str(paths["fields"]), "--template", "qwen2_vl",
                           "--save_name", str(preds), "--temperature", "0", "--max_new_tokens", "16",
                           "--batch_size", "8", "--image_max_pixels", str(TINY_IMAGE_MAX_PIXELS), "--seed", "0",
                           "--no_progress"])
        if rc != 0:
            raise SlideChatError(f"slidechat infer failed (exit code {rc})", preds)

    with steps.step("[cytology 6/7] scores (slidechat eval cytology)"):
        rc = command_line(["eval", "cytology", str(preds), "--out", str(scores_dir)])
        if rc != 0:
            raise SlideChatError(f"slidechat eval cytology failed (exit code {rc})", preds)

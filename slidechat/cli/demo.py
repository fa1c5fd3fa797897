"""``slidechat demo``: the main job end to end on the embedded default, on CPU.

Slide path: synthetic slides -> feature extraction (tiny encoder) -> tiny offline LLM -> instruction
data -> ``xtuner train`` stage 1 -> stage 2 -> SlideBench-style test -> accuracy table.
Cytology path: synthetic fields of view -> LLaMA-Factory datasets -> tiny offline Qwen2-VL ->
``xtuner train`` (full fine-tune) -> export to a plain Hugging Face folder -> ``slidechat infer`` ->
``slidechat eval cytology`` scores -> ``slidechat screen`` on held-out synthetic cytology slides -> AUC.
Every step is skipped when its output already exists, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

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
    res = subprocess.run(cmd, env=env)
    # xtuner's launcher returns 0 even when training failed: judge by the checkpoint it must leave
    if res.returncode != 0 or not _trained(work_dir):
        raise SlideChatError(f"xtuner train did not finish (exit code {res.returncode}, no "
                             f"last_checkpoint; see the log under {work_dir})", config)


def _trained(work_dir: Path) -> bool:
    return (work_dir / "last_checkpoint").is_file()


def run(args: argparse.Namespace) -> int:
    root = Path(args.work_dir)
    if args.fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    if args.part in ("all", "slide"):
        run_slide_demo(root, args.n_slides)
    if args.part in ("all", "cytology"):
        run_cytology_demo(root, args.n_fields, args.n_cyto_slides)
    return 0


def run_slide_demo(root: Path, n_slides: int) -> None:
    """Whole slides: synthetic WSIs -> features -> stage 1 -> stage 2 -> SlideBench test."""
    from slidechat.data.synthetic import FEATURE_TEMPLATE, write_synthetic_dataset
    from slidechat.engine.overrides import parse_cfg_options, path_overrides
    from slidechat.engine.testing import run_test
    from slidechat.features.pipeline import extract_slides
    from slidechat.model.tiny_llm import make_tiny_llm
    from slidechat.wsi.synthetic import make_demo_slides

    slides_dir, feat_dir = root / "slides", root / "features"
    llm_dir, data_dir = root / "tiny_llm", root / "data"
    stage1, stage2, test_dir = root / "stage1", root / "stage2", root / "test"

    logger.info("[slide 1/7] synthetic slides")
    manifest = slides_dir / "manifest.csv"
    if not manifest.is_file():
        manifest = make_demo_slides(slides_dir, n_slides=n_slides, seed=0)
    import pandas as pd

    slide_paths = pd.read_csv(manifest)["path"].tolist()

    logger.info("[slide 2/7] feature extraction (tiny_test encoder, 20x, 224 px)")
    summary = extract_slides(slide_paths, feat_dir, encoder="tiny_test", save_csv=True, save_qc=True)
    if summary.get("failed"):
        raise SlideChatError(f"{len(summary['failed'])} slide(s) failed; see failures.csv", feat_dir)

    logger.info("[slide 3/7] tiny offline LLM + tokenizer")
    if not (llm_dir / "config.json").is_file():
        make_tiny_llm(llm_dir)

    logger.info("[slide 4/7] instruction data (training slides) and test CSV (held-out slides)")
    data = write_synthetic_dataset(manifest, data_dir, seed=0, holdout_every=3, mcq_variants=4)

    h5_root = feat_dir / "h5_files"
    common = dict(llm_name_or_path=llm_dir, feature_root=h5_root)
    logger.info("[slide 5/7] stage 1 (alignment: slide encoder + projector, LLM frozen)")
    if not _trained(stage1):
        _xtuner_train(_config("stage_1.py"), stage1,
                      path_overrides(data_path=data["stage1"], **common))
    logger.info("[slide 6/7] stage 2 (instruction tuning: everything trained)")
    if not _trained(stage2):
        _xtuner_train(_config("stage_2.py"), stage2,
                      path_overrides(data_path=data["stage2"], pretrained_pth=stage1, **common))

    logger.info("[slide 7/7] SlideBench-style test + scoring")
    out_csv = test_dir / "test_vqa_output.csv"
    report = run_test(config=_config("stage_2.py"), checkpoint=stage2,
                      test_slide_csv=data["test_vqa"], test_output_csv=out_csv,
                      feature_root=h5_root, feature_template=FEATURE_TEMPLATE, batch_size=8,
                      cfg_options=parse_cfg_options(path_overrides(**common)))

    print("\n" + _report_markdown(report, out_csv))
    print(f"""
Outputs (under {root}):
  slides + truth masks      {slides_dir}
  features (H5, CLAM)       {h5_root}
  features (SlideChat CSV)  {feat_dir / 'csv'}
  QC pictures               {feat_dir / 'qc'}
  tiny LLM + tokenizer      {llm_dir}
  training data             {data_dir}
  stage-1 / stage-2 runs    {stage1}  {stage2}
  test predictions          {out_csv}
""")


def _report_markdown(report: object, out_csv: Path) -> str:
    if hasattr(report, "to_markdown"):
        return report.to_markdown()
    md = Path(str(out_csv) + ".report.md")
    if md.is_file():
        return md.read_text()
    from slidechat.evaluation.mcq import score_mcq
    from slidechat.evaluation.slidebench import read_output

    return score_mcq(read_output(out_csv)).to_markdown()


def run_cytology_demo(root: Path, n_fields: int, n_cyto_slides: int) -> Dict[str, Any]:
    """Cytology fields of view: synthetic fields -> tiny Qwen2-VL trained with ``xtuner train`` ->
    export -> ``slidechat infer`` -> cytology scores -> slide screening with AUC.

    The tiny model is taught the screening question only (``configs/tiny/cytochat_screen.py``: the
    other tasks would need far more CPU time than a demo has); inference and scoring run on the
    held-out screening and multiple-choice fields, so the report shows a taught task beside tasks the
    model never saw (it answers those like the screening question: option A or B, whatever the options).
    """
    from slidechat.cli.main import main as cli_main
    from slidechat.data.synthetic_cytology import write_fields_dataset
    from slidechat.engine.screening import run_screen_demo
    from slidechat.model.qwen2vl_train import export_qwen2vl
    from slidechat.model.tiny_qwen2vl import make_tiny_qwen2vl

    fields_dir, vlm_dir = root / "cytology", root / "tiny_qwen2vl"
    sft_dir, hf_dir = root / "cytochat_screen", root / "cytochat_screen_hf"
    infer_dir, scores_dir = root / "cytology_infer", root / "cytology_scores"
    config = _config("cytochat_screen.py")

    logger.info("[cytology 1/7] synthetic fields of view + LLaMA-Factory datasets")
    if not (fields_dir / "dataset_info.json").is_file():
        write_fields_dataset(fields_dir, n_fields=n_fields, seed=0, size=224, test_fraction=0.1)

    logger.info("[cytology 2/7] tiny offline Qwen2-VL + processor")
    if not (vlm_dir / "config.json").is_file():
        make_tiny_qwen2vl(vlm_dir)

    logger.info("[cytology 3/7] fine-tune (vision tower included) with xtuner train (%s)", config.name)
    if not _trained(sft_dir):
        _xtuner_train(config, sft_dir, [
            f"model.model_name_or_path={vlm_dir}", f"train_dataloader.dataset.processor={vlm_dir}",
            f"train_dataloader.dataset.dataset_dir={fields_dir}"])

    logger.info("[cytology 4/7] export to a plain Hugging Face folder")
    if not (hf_dir / "config.json").is_file():
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
        export_qwen2vl(config, sft_dir, hf_dir, cfg_options={
            "model.model_name_or_path": str(vlm_dir), "train_dataloader.dataset.processor": str(vlm_dir),
            "train_dataloader.dataset.dataset_dir": str(fields_dir)})

    logger.info("[cytology 5/7] slidechat infer on the held-out fields (screening + MCQ, greedy)")
    preds = infer_dir / "generated_predictions.jsonl"
    rc = cli_main(["infer", "--model_name_or_path", str(hf_dir), "--dataset",
                   "cyto_screening_test,cyto_mcq_test",
                   "--dataset_dir", str(fields_dir), "--template", "qwen2_vl", "--save_name", str(preds),
                   "--temperature", "0", "--max_new_tokens", "16", "--batch_size", "8",
                   "--image_max_pixels", str(TINY_IMAGE_MAX_PIXELS), "--seed", "0", "--no_progress"])
    if rc != 0:
        raise SlideChatError(f"slidechat infer failed (exit code {rc})", preds)

    logger.info("[cytology 6/7] scores (slidechat eval cytology)")
    rc = cli_main(["eval", "cytology", str(preds), "--out", str(scores_dir)])
    if rc != 0:
        raise SlideChatError(f"slidechat eval cytology failed (exit code {rc})", preds)

    logger.info("[cytology 7/7] slide screening on %d held-out synthetic cytology slides", n_cyto_slides)
    summary = run_screen_demo(root, hf_dir, n_slides=n_cyto_slides,
                              image_max_pixels=TINY_IMAGE_MAX_PIXELS)
    print(f"\nSlide-level screening ({n_cyto_slides} held-out synthetic slides): "
          f"{summary['metrics_line']}")
    print(f"""
Cytology outputs (under {root}):
  fields + datasets         {fields_dir}
  tiny Qwen2-VL             {vlm_dir}
  training run / export     {sft_dir}  {hf_dir}
  predictions (JSONL)       {preds}
  scores (Markdown + JSON)  {scores_dir}
  screening (ROC, heatmaps, galleries, reports)  {root / 'screen'}
""")
    return summary

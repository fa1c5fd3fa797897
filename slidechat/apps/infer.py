"""The ``slidechat infer`` application: a LLaMA-Factory dataset answered by a Qwen VL model into vllm_infer's
JSONL, resumable.

The way of the data: :class:`InferSettings` (checked: :func:`check_settings`) -> the dataset
(:func:`slidechat.data.llamafactory.read_llamafactory`) -> items -> the writer
(:class:`~slidechat.inference.writers.JsonlPredictionWriter`, resuming what the output holds) and its
settings file (a resume with other prediction settings is refused) -> the family (transformers or
vLLM, :func:`build_family`) -> :func:`slidechat.inference.loop.run_inference`. The input is checked
before the model loads (minutes at 7B): the output path, the rows, that some image exists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import transformers

from slidechat.data.llamafactory import read_llamafactory
from slidechat.inference.loop import (INFER_TEMPLATES, CytologyItem, GenerationFamily, InferenceStats,
                                      Qwen2VLFamily, SamplingSettings, VllmQwen2VLFamily, cytology_items,
                                      require_vllm, run_inference)
from slidechat.inference.writers import JsonlPredictionWriter, check_run_settings
from slidechat.model.qwen2vl import load_qwen2vl, read_family
from slidechat.utils.devices import resolve_device_dtype
from slidechat.utils.errors import SlideChatError
from slidechat.utils.outputs import require_file_path

logger = logging.getLogger(__name__)

#: rows per generate call when none is given: vllm_infer's 1024; transformers' padded batches grow with
#: the longest row, so fewer
DEFAULT_BATCH = {"vllm": 1024, "transformers": 8}


@dataclass(frozen=True)
class InferSettings:
    """What one ``slidechat infer`` run is asked to do: vllm_infer's flags (same names and defaults)."""

    model_name_or_path: str
    adapter_name_or_path: Optional[str] = None
    template: Optional[str] = None  # None: the model folder's family's (see model_template)
    engine: str = "transformers"
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    allow_partial: bool = False
    dataset: str = "alpaca_en_demo"
    dataset_dir: str = "data"
    max_samples: Optional[int] = None
    skip_bad: bool = False
    cutoff_len: int = 2048
    default_system: Optional[str] = None
    image_max_pixels: int = 768 * 768
    image_min_pixels: int = 32 * 32
    max_new_tokens: int = 1024
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    batch_size: Optional[int] = None  # None: DEFAULT_BATCH of the engine (see check_settings)
    prefix_reuse: bool = True  # transformers engine: one image's questions share one prefill (issue 14)
    seed: Optional[int] = None
    vllm_config: str = "{}"
    pipeline_parallel_size: int = 1
    enable_thinking: bool = True
    video_fps: float = 2.0
    video_maxlen: int = 128
    save_name: str = "generated_predictions.jsonl"
    overwrite: bool = False
    progress: bool = True

    def sampling(self) -> SamplingSettings:
        return SamplingSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                top_p=self.top_p, top_k=self.top_k,
                                repetition_penalty=self.repetition_penalty, seed=self.seed)

    def text_options(self) -> Dict[str, Any]:
        """The prompt and decoding keywords both families take (``_Qwen2VLText``)."""
        return dict(cutoff_len=self.cutoff_len, skip_special_tokens=self.skip_special_tokens,
                    default_system=self.default_system, image_max_pixels=self.image_max_pixels,
                    image_min_pixels=self.image_min_pixels, template=self.template,
                    enable_thinking=self.enable_thinking)


def check_settings(s: InferSettings) -> InferSettings:
    """The settings checked (one line per mistake, before anything is read) with the engine's default
    batch size filled in."""
    if s.template is not None and s.template not in INFER_TEMPLATES:
        raise SlideChatError(f"unknown template {s.template!r}: slidechat infer supports "
                             f"{', '.join(INFER_TEMPLATES)} (CytoChat / Qwen2-VL)",
                             hint="slide models (SlideChat) are run with `slidechat test`")
    if s.batch_size is None:
        s = dataclasses.replace(s, batch_size=DEFAULT_BATCH[s.engine])
    for name in ("max_new_tokens", "batch_size", "cutoff_len", "image_max_pixels", "image_min_pixels"):
        if getattr(s, name) < 1:
            raise SlideChatError(f"--{name} must be >= 1 (got {getattr(s, name)})")
    if s.max_samples is not None and s.max_samples < 1:
        raise SlideChatError(f"--max_samples must be >= 1 (got {s.max_samples})")
    if s.temperature < 0 or not (0 < s.top_p <= 1) or s.repetition_penalty <= 0:
        raise SlideChatError("need --temperature >= 0, 0 < --top_p <= 1, --repetition_penalty > 0")
    if s.pipeline_parallel_size < 1:
        raise SlideChatError(f"--pipeline_parallel_size must be >= 1 (got {s.pipeline_parallel_size})")
    if s.pipeline_parallel_size > 1 and s.engine != "vllm":
        raise SlideChatError(f"--pipeline_parallel_size {s.pipeline_parallel_size}: the transformers engine "
                             "runs on one device", hint="use --engine vllm, or leave it at 1")
    if s.video_fps <= 0 or s.video_maxlen < 1:
        raise SlideChatError("need --video_fps > 0 and --video_maxlen >= 1")
    if s.engine == "vllm":
        _check_vllm(s)
    return s


def _check_vllm(s: InferSettings) -> None:
    """``--engine vllm``: installed, and as many GPUs as the pipeline stages (vllm_infer's check)."""
    require_vllm()
    if s.pipeline_parallel_size > max(torch.cuda.device_count(), 1):
        # vllm_infer's own check: "Pipeline parallel size should be smaller than the number of gpus."
        raise SlideChatError(f"--pipeline_parallel_size {s.pipeline_parallel_size} is more than the "
                             f"{torch.cuda.device_count()} GPU(s) here")


def model_template(s: InferSettings) -> InferSettings:
    """``template`` left out: the model folder's family decides (its config's ``model_type``); resolved
    before the run settings are recorded, so a resume compares the template actually used."""
    if s.template is not None:
        return s
    try:
        return dataclasses.replace(s, template=read_family(s.model_name_or_path)[1].lf_template)
    except SlideChatError:  # the model load says what is wrong with the folder, in its own order
        return s


#: settings that change the predictions (a resume with other values is refused)
SETTINGS_KEYS = ("model_name_or_path", "adapter_name_or_path", "template", "engine", "cutoff_len",
                 "default_system", "image_max_pixels", "image_min_pixels", "max_new_tokens", "temperature",
                 "top_p", "top_k", "repetition_penalty", "skip_special_tokens", "seed", "vllm_config")


def run_settings(s: InferSettings) -> Dict[str, Any]:
    """What produced the predictions (model folders as absolute paths); batch size and device excluded."""
    out = {k: getattr(s, k) for k in SETTINGS_KEYS}
    for k in ("model_name_or_path", "adapter_name_or_path"):
        if out[k] is not None:
            out[k] = os.path.abspath(out[k])
    if out["temperature"] == 0:  # greedy: the sampling knobs do not matter
        for k in ("top_p", "top_k", "seed"):
            out[k] = None
    return out


def check_images_exist(items: Sequence[CytologyItem], dataset_dir: str) -> None:
    """A missing image is one row's ``error``; none of them there (a wrong --dataset_dir, images not
    copied) is one line now, before the model loads, not an output of error rows after it."""
    paths = [p for it in items for p in it.images]
    missing = [p for p in paths if not os.path.isfile(p)]
    if paths and len(missing) == len(paths):
        raise SlideChatError(f"none of the dataset's {len(paths)} image files exists (first: {missing[0]})",
                             dataset_dir, hint="check --dataset_dir and the rows' image paths")
    if missing:
        logger.warning("%d of %d image files are missing (first: %s); their rows will get an error",
                       len(missing), len(paths), missing[0])


def read_items(s: InferSettings) -> List[CytologyItem]:
    """The dataset's rows as items to answer, images checked to be there (not decoded yet)."""
    examples = read_llamafactory(s.dataset, s.dataset_dir, check_images=False, max_samples=s.max_samples,
                                 skip_bad=s.skip_bad, lf_rules=s.skip_bad, predict=True)
    if not examples:
        raise SlideChatError(f"dataset {s.dataset!r} has no rows", s.dataset_dir)
    items = cytology_items(examples, s.default_system)
    check_images_exist(items, s.dataset_dir)  # before the model loads
    return items


def build_family(s: InferSettings) -> GenerationFamily:
    """The engine's family: vLLM set up as vllm_infer, or the model loaded with transformers."""
    sampling = s.sampling()
    if s.engine == "vllm":
        try:
            vcfg = json.loads(s.vllm_config)
        except json.JSONDecodeError as e:
            raise SlideChatError(f"--vllm_config is not JSON: {e}") from e
        return VllmQwen2VLFamily(s.model_name_or_path, sampling, adapter_name_or_path=s.adapter_name_or_path,
                                 vllm_config=vcfg, trust_remote_code=s.trust_remote_code,
                                 pipeline_parallel_size=s.pipeline_parallel_size, **s.text_options())
    device, dtype = resolve_device_dtype(s.device, s.dtype)
    if s.seed is not None:
        transformers.set_seed(s.seed)
    model, processor = load_qwen2vl(s.model_name_or_path, s.adapter_name_or_path, torch_dtype=dtype,
                                    device=device, trust_remote_code=s.trust_remote_code,
                                    allow_partial=s.allow_partial)
    return Qwen2VLFamily(model, processor, sampling, prefix_reuse=s.prefix_reuse, max_batch=int(s.batch_size or 8),
                         **s.text_options())


def run_infer(settings: InferSettings) -> Optional[InferenceStats]:
    """Answer every row the output does not hold yet; ``None`` when it held them all already."""
    s = check_settings(settings)
    require_file_path(s.save_name, "--save_name")  # the output rule, before the dataset or model
    items = read_items(s)
    s = model_template(s)
    writer = JsonlPredictionWriter(s.save_name, [(it.key, it.images) for it in items], overwrite=s.overwrite)
    try:
        check_run_settings(s.save_name, run_settings(s), fresh=writer.done == 0)
        if writer.complete:
            logger.info("%s already holds all %d predictions (use --overwrite to redo them)",
                        s.save_name, len(items))
            return None
        family = build_family(s)
        sampling = s.sampling()
        logger.info("%s: %d rows, %d done, %d to run (batch %d, %s engine, %s, prefix reuse %s)", s.save_name,
                    len(items), writer.done, writer.num_pending, s.batch_size, s.engine,
                    "greedy" if sampling.greedy else f"temperature {sampling.temperature}",
                    "on" if getattr(family, "prefix_reuse", False) else "off")
        return run_inference(items, writer, family, batch_size=s.batch_size, progress=s.progress,
                             desc="slidechat infer")
    finally:
        writer.close()

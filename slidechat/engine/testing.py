"""SlideBench testing through mmengine's test loop (``xtuner test`` and ``slidechat test``).

``--cfg-options`` can only change a config's TOP-LEVEL keys after parsing (values were already
copied into nested dicts), so the test set-up is read from top-level keys by
:class:`SlideBenchTestLoop` when the runner builds it:

==================  ==========================================================================
``test_slide_csv``  SlideBench question CSV (required)
``test_output_csv`` answers: input columns + ``Output`` (+ ``Pred``) + ``Error`` (required)
``feature_root``    folder of feature files (required to find features)
``feature_template`` e.g. ``{feature_root}/{Tumor}/{Slide}`` (default: from the CSV's columns)
``test_batch_size`` rows per generation batch (default 8)
``max_new_tokens``  default 500 (greedy decoding)
``max_prompt_tokens`` cap on a prompt's text tokens (default: the LLM's context length minus
                    ``max_new_tokens``; see :mod:`slidechat.data.limits`). An over-long row gets
                    an ``Error`` entry, the rest of its batch is answered, a resume moves past it.
``test_task``       ``mcq`` or ``caption`` to force the task (default: from the CSV's columns)
``prefix_reuse``    the questions of one slide share one encode and one prefill (default True;
                    ``slidechat test --no-prefix-reuse`` sets False: today's path, for A/B runs)
``overwrite``       start the output afresh instead of resuming (default False)
==================  ==========================================================================

The loop owns a :class:`SlideBenchWriter`: its dataset holds only the rows not yet in the output,
so a killed run resumes at the first missing row (no duplicates, nothing lost). mmengine owns the
iteration (hooks, the evaluator, sharding under a launcher); each batch is answered by the one batch
step of :mod:`slidechat.inference.loop` (:func:`~slidechat.inference.loop.generate_into` with
:class:`~slidechat.inference.loop.SlideFamily`: one batched generate, each row alone if the batch
fails), the same step ``run_inference`` uses. The answers go through the evaluator
(:class:`SlideBenchMetric`), which appends them to the output and, at the end, scores the whole file
and writes ``<output>.report.json`` / ``.report.md``. A row whose features are missing or unreadable
gets an ``Error`` entry; the other rows still run.

``slidechat test`` and Python callers take the same path through :func:`slidechat.apps.test.run_test`:
the runner built from the config with the top-level overrides, the checkpoint loaded through the
model's strict key check (as ``xtuner test`` does), ``runner.test()``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from mmengine.evaluator import BaseMetric
from mmengine.registry import LOOPS, METRICS
from mmengine.runner import TestLoop
from torch.utils.data import SequentialSampler

from slidechat.data.limits import model_prompt_limit
from slidechat.data.slidebench import (TASKS, SlideBenchItem, SlideBenchTable, SlideBenchWriter, merge_shards,
                                       read_csv_text, read_slidebench, require_rows)
from slidechat.data.slidebench_dataset import SlideBenchTestDataset
from slidechat.data.template import config_template, describe_template
from slidechat.evaluation.captions import caption_metrics
from slidechat.evaluation.mcq import score_mcq
from slidechat.evaluation.tables import caption_markdown, write_reports
from slidechat.inference.loop import SlideFamily, generate_into, group_batches
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)

#: top-level config keys read by the loop, with their defaults
TEST_KEYS: Dict[str, Any] = {
    "test_slide_csv": None,
    "test_output_csv": None,
    "feature_root": None,
    "feature_template": None,
    "test_batch_size": 8,
    "max_new_tokens": 500,
    "overwrite": False,
    "test_caption_prompt": None,
    "max_prompt_tokens": None,
    "test_task": None,
    "prefix_reuse": True,
}


def _log(msg: str, level: int = logging.INFO) -> None:
    """To the runner's log file and console (mmengine logger) when one exists, else ``logging``."""
    try:
        from mmengine.logging import print_log

        print_log(msg, logger="current", level=level)
    except Exception:  # noqa: BLE001 - logging only
        logger.log(level, msg)


# --------------------------------------------------------------------------- settings

@dataclass
class TestSettings:
    test_slide_csv: Path
    test_output_csv: Path
    feature_root: Optional[Path]
    feature_template: Optional[str]
    batch_size: int
    max_new_tokens: int
    overwrite: bool
    caption_prompt: Optional[str] = None
    max_prompt_tokens: Optional[int] = None
    task: Optional[str] = None
    prefix_reuse: bool = True

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any], defaults: Optional[Mapping[str, Any]] = None
                 ) -> "TestSettings":
        """Top-level config keys win over ``defaults`` (the test loop's own arguments)."""
        vals = dict(TEST_KEYS)
        vals.update({k: v for k, v in (defaults or {}).items() if v is not None})
        vals.update({k: cfg[k] for k in TEST_KEYS if k in cfg and cfg[k] is not None})
        for key in ("test_slide_csv", "test_output_csv"):
            if not vals[key]:
                raise SlideChatError(f"config has no {key}",
                                     hint=f"pass --cfg-options {key}=PATH (or slidechat test "
                                          f"--{key} PATH)")
        bs, mnt = int(vals["test_batch_size"]), int(vals["max_new_tokens"])
        if bs < 1 or mnt < 1:
            raise SlideChatError(f"test_batch_size ({bs}) and max_new_tokens ({mnt}) must be >= 1")
        root = vals["feature_root"]
        mpt = vals["max_prompt_tokens"]
        mpt = None if mpt in (None, "") else int(mpt)
        if mpt is not None and mpt < 1:
            raise SlideChatError(f"max_prompt_tokens ({mpt}) must be >= 1")
        task = vals["test_task"] or None
        if task is not None and task not in TASKS:
            raise SlideChatError(f"test_task {task!r} is not one of {', '.join(TASKS)}")
        return cls(test_slide_csv=Path(vals["test_slide_csv"]), test_output_csv=Path(vals["test_output_csv"]),
                   feature_root=None if root in (None, "") else Path(root),
                   feature_template=vals["feature_template"] or None, batch_size=bs, max_new_tokens=mnt,
                   overwrite=_as_bool(vals["overwrite"]), caption_prompt=vals["test_caption_prompt"],
                   max_prompt_tokens=mpt, task=task, prefix_reuse=_as_bool(vals["prefix_reuse"]))


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


# --------------------------------------------------------------------------- report

@dataclass
class TestReport:
    """What a test run produced: the output CSV and its scores (MCQ accuracy or caption metrics)."""

    output_csv: Path
    kind: str
    n_rows: int
    n_errors: int
    markdown: str
    mcq: Any = None  # McqReport
    caption: Optional[Dict[str, Any]] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_markdown(self) -> str:
        return self.markdown

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"output_csv": str(self.output_csv), "kind": self.kind, "n_rows": self.n_rows,
                             "n_errors": self.n_errors, **self.extra}
        if self.mcq is not None:
            d["mcq"] = self.mcq.to_dict()
        if self.caption is not None:
            d["caption"] = {k: v for k, v in self.caption.items() if k != "rows"}
        return d

    def metrics(self) -> Dict[str, float]:
        """Flat scalars for mmengine's logger."""
        m: Dict[str, float] = {"rows": float(self.n_rows), "errors": float(self.n_errors)}
        if self.mcq is not None:
            m["accuracy"] = float(self.mcq.overall["accuracy"])
            m["unparsed"] = float(self.mcq.overall["unparsed"])
        if self.caption is not None:
            m.update({k: float(v) for k, v in self.caption["corpus"].items()})
        return m


def report_paths(output_csv: PathLike) -> Tuple[Path, Path]:
    p = Path(output_csv)
    return p.with_name(p.name + ".report.json"), p.with_name(p.name + ".report.md")


def score_output(output_csv: PathLike, kind: str, write: bool = True) -> TestReport:
    """Score a complete output CSV and (by default) write ``<output>.report.json/.md`` beside it."""
    out = Path(output_csv)
    df = read_csv_text(out)
    require_rows(df, out, "rows to score")  # a header-only output is an error, not accuracy 0/0
    n_err = int((df["Error"].str.strip() != "").sum()) if "Error" in df.columns else 0
    mcq = caption = None
    if kind != "caption":
        if "Answer" in df.columns:
            mcq = score_mcq(df, source=str(out))
            md = mcq.to_markdown()
        else:
            md = f"`{out.name}`: {len(df)} rows answered ({n_err} errors); no `Answer` column, not scored.\n"
    else:
        ref = read_slidebench(out, kind="caption").ref_column  # first CAPTION_REF_COLUMNS present
        if ref is not None:
            caption = caption_metrics(df["Output"].tolist(), df[ref].tolist(), per_row=False)
            caption.update(source=str(out), pred_column="Output", ref_column=ref)
            md = caption_markdown(caption, str(out))
        else:
            md = f"`{out.name}`: {len(df)} captions written ({n_err} errors); no reference column.\n"
    if n_err:
        md += f"\n{n_err} row(s) failed (see the `Error` column of `{out.name}`).\n"
    report = TestReport(output_csv=out, kind=kind, n_rows=len(df), n_errors=n_err, markdown=md, mcq=mcq,
                        caption=caption)
    if write:
        js, mdp = report_paths(out)
        write_reports(report.to_dict(), md, js, mdp)
    return report


# --------------------------------------------------------------------------- evaluator

@METRICS.register_module(force=True)
class SlideBenchMetric(BaseMetric):
    """``test_evaluator``: appends each answered batch to the output CSV, scores it at the end.

    The writer is attached by :class:`SlideBenchTestLoop` (which owns the resume state).
    """

    default_prefix = "slidebench"

    def __init__(self, collect_device: str = "cpu", prefix: Optional[str] = None,
                 write_reports: bool = True) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.write_reports = write_reports
        self.writer: Optional[SlideBenchWriter] = None
        self.world_size = 1
        self.report: Optional[TestReport] = None

    def bind(self, writer: SlideBenchWriter, world_size: int = 1) -> None:
        self.writer = writer
        self.world_size = world_size
        self.report = None

    def process(self, data_batch: Any, data_samples: Sequence[Any]) -> None:
        if self.writer is None:
            raise SlideChatError("SlideBenchMetric needs test_cfg=dict(type=SlideBenchTestLoop)")
        self.writer.write(list(data_samples))
        self.results.append(len(data_samples))

    def compute_metrics(self, results: list) -> Dict[str, float]:
        assert self.writer is not None
        table, final = self.writer.table, self.writer.final_path
        if self.world_size > 1:
            merge_shards(table, final, self.world_size)
        self.report = score_output(final, table.kind, write=self.write_reports)
        _log(f"SlideBench results ({final}):\n{self.report.to_markdown()}")
        return self.report.metrics()

    def evaluate(self, size: int) -> Dict[str, float]:
        """Every rank wrote its own rows; rank 0 merges (if sharded), scores and shares the metrics."""
        from mmengine.dist import barrier, broadcast_object_list, is_main_process

        if self.writer is not None:
            self.writer.close()
        barrier()
        metrics: List[Any] = [None]
        if is_main_process():
            m = self.compute_metrics(self.results)
            metrics = [{f"{self.prefix}/{k}" if self.prefix else k: v for k, v in m.items()}]
        if self.world_size > 1:
            broadcast_object_list(metrics)
        self.results.clear()
        return metrics[0]


# --------------------------------------------------------------------------- loop

def prepared_rows(instances: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The test dataloader's ``collate_fn``: the batch's prepared rows as they are
    (``SlideBenchTestDataset.prepare_item`` outputs); :class:`SlideFamily` collates the runnable ones
    when it generates, so a failed batch can be retried row by row."""
    return list(instances)


def _unwrap(model: Any) -> Any:
    from mmengine.model import is_model_wrapper

    return model.module if is_model_wrapper(model) else model


@LOOPS.register_module(force=True)
class SlideBenchTestLoop(TestLoop):
    """mmengine test loop over the rows of ``test_slide_csv`` still missing from ``test_output_csv``.

    Arguments given here are defaults; the config's top-level keys (see module doc) win, since
    those are what ``--cfg-options`` can change. ``generation_kwargs`` go to ``generate`` (greedy by
    default).
    """

    def __init__(self, runner: Any, dataloader: Any, evaluator: Any, fp16: bool = False,
                 batch_size: Optional[int] = None, max_new_tokens: Optional[int] = None,
                 generation_kwargs: Optional[Mapping[str, Any]] = None,
                 template: Optional[str] = None, system: str = "") -> None:
        from mmengine.dist import get_dist_info

        cfg = runner.cfg
        self.settings = s = TestSettings.from_cfg(
            cfg, {"test_batch_size": batch_size, "max_new_tokens": max_new_tokens})
        if "tokenizer" not in cfg:
            raise SlideChatError("config has no top-level 'tokenizer'")
        model = _unwrap(runner.model)
        core_cfg = model.core.config
        table: SlideBenchTable = read_slidebench(s.test_slide_csv, kind=s.task)
        rank, world = get_dist_info()
        self.world_size = world
        self.writer = SlideBenchWriter(table, s.test_output_csv, overwrite=s.overwrite,
                                       feature_root=s.feature_root, feature_template=s.feature_template,
                                       caption_prompt=s.caption_prompt,
                                       shard=(rank, world) if world > 1 else None)
        pending_idx = self.writer.indices[self.writer.done:]
        items = [self.writer.make_item(i) for i in pending_idx]
        if s.feature_root is None:
            _log("no feature_root: every row will get an Error", logging.WARNING)
        dl = dict(dataloader) if isinstance(dataloader, Mapping) else {}
        ds_cfg = dict(dl.get("dataset") or {})
        ds_cfg.pop("type", None)
        ds_cfg.update(items=items, tokenizer=cfg.tokenizer, feature_dim=core_cfg.feature_dim,
                      max_patches=core_cfg.max_patches_test, system=system,
                      # the prompt format the model was trained with (its slidechat_config) unless the
                      # loop names another
                      template=(config_template(core_cfg.prompt_template, core_cfg.chat_template_kwargs)
                                if template is None else template),
                      prompt_limit=model_prompt_limit(model.core, s.max_new_tokens, s.max_prompt_tokens))
        dataset = SlideBenchTestDataset(**ds_cfg)
        _log(f"prompt format: {describe_template(dataset.template)}")
        dl.update(dataset=dataset, batch_size=s.batch_size, sampler=SequentialSampler(dataset),
                  collate_fn=prepared_rows, shuffle=None)
        dl.pop("shuffle")
        dl.setdefault("num_workers", 0)
        dl.pop("batch_sampler", None)
        if s.prefix_reuse:  # one slide's questions in one batch (inference.loop.group_batches)
            dl.update(batch_sampler=group_batches([SlideFamily.group_key(it) for it in items], s.batch_size))
            dl.pop("batch_size")  # mmengine still wants a sampler; the batch sampler replaces it
        super().__init__(runner, dl, evaluator, fp16)
        self.tokenizer = dataset.tokenizer
        metrics = [m for m in self.evaluator.metrics if isinstance(m, SlideBenchMetric)]
        if len(metrics) != 1:
            raise SlideChatError("test_evaluator must hold one SlideBenchMetric "
                                 "(test_evaluator = dict(type=SlideBenchMetric))")
        self.metric = metrics[0]
        self.metric.bind(self.writer, world)
        self.family = SlideFamily(model, dataset, max_new_tokens=s.max_new_tokens, fp16=fp16,
                                  generation_kwargs=generation_kwargs, prefix_reuse=s.prefix_reuse,
                                  batch_size=s.batch_size)
        self.generation_kwargs = self.family.generation_kwargs
        self.report: Optional[TestReport] = None
        self.timings: Dict[str, float] = self.family.timings
        self.timings["total_s"] = 0.0
        _log(f"SlideBench test: {table.path} ({table.kind}, {len(table)} rows) -> {self.writer.path}: "
             f"{self.writer.done} done, {len(items)} to run, batch {s.batch_size}, "
             f"max_new_tokens {s.max_new_tokens}, max_patches {core_cfg.max_patches_test}, "
             f"prefix reuse {'on' if s.prefix_reuse else 'off'}")

    def run(self) -> Dict[str, float]:
        t0 = time.perf_counter()
        try:
            metrics = super().run()
        finally:
            self.writer.close()
        self.timings["total_s"] = time.perf_counter() - t0
        self.report = self.metric.report
        t = self.timings
        if t["rows_generated"]:
            _log(f"generated {t['rows_generated']} rows ({t['new_tokens']} new tokens) in "
                 f"{t['generate_s']:.1f} s of {t['total_s']:.1f} s; "
                 f"{t['rows_generated'] / t['total_s']:.2f} rows/s")
        return metrics

    @torch.no_grad()
    def run_iter(self, idx: int, data_batch: List[Dict[str, Any]]) -> None:
        """One batch of prepared rows (see :func:`prepared_rows`) through the shared batch step."""
        self.runner.call_hook("before_test_iter", batch_idx=idx, data_batch=data_batch)
        items: List[SlideBenchItem] = [inst["item"] for inst in data_batch]
        self.family.hold(data_batch)
        generate_into(items, self.family.generate)
        self.evaluator.process(data_samples=items, data_batch=data_batch)
        self.runner.call_hook("after_test_iter", batch_idx=idx, data_batch=data_batch, outputs=items)

"""The SlideBench test application (``slidechat test`` and Python callers): one run, asked as a
:class:`TestOptions` bundle.

The same path as ``xtuner test``: the mmengine Runner is built from the config with the options as
top-level overrides (the keys :class:`slidechat.engine.testing.SlideBenchTestLoop` reads), the
checkpoint, resolved once at the command's entry, is loaded through the model's strict key check, and
``runner.test()`` answers, writes and scores. The inputs are checked before the model is built
(minutes at 7B): a wrong path is one line at once, not N error rows later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from slidechat.data.slidebench import (SlideBenchTable, check_template, default_template, read_slidebench,
                                       resolve_feature_path)
from slidechat.engine.builder import build_runner, checkpoint_overrides, load_config
from slidechat.engine.testing import TestReport, TestSettings, score_output
from slidechat.features.io import check_feature_provenance
from slidechat.model.checkpoint import ResolvedCheckpoint
from slidechat.utils.errors import SlideChatError
from slidechat.utils.logging import route_mmengine_logs_to_stderr
from slidechat.utils.outputs import require_file_path


@dataclass(frozen=True)
class TestOptions:
    """One test run as asked (``slidechat test``'s flags). ``None`` keeps the config's value;
    ``allow_partial`` accepts a checkpoint lacking trained weights (warning) instead of refusing it."""

    config: Path
    checkpoint: Optional[ResolvedCheckpoint]
    test_slide_csv: Path
    test_output_csv: Path
    feature_root: Optional[Path] = None
    feature_template: Optional[str] = None
    batch_size: Optional[int] = None
    max_new_tokens: Optional[int] = None
    overwrite: bool = False
    task: Optional[str] = None
    max_prompt_tokens: Optional[int] = None
    compat: Optional[str] = None
    prefix_reuse: Optional[bool] = None  # None: the config's prefix_reuse (default on)
    cfg_options: Mapping[str, Any] = field(default_factory=dict)
    work_dir: Optional[Path] = None
    launcher: str = "none"
    allow_partial: bool = False
    trust_remote_code: bool = False
    __test__ = False  # a bundle, not a pytest test class

    def test_keys(self) -> Dict[str, Any]:
        """The config's top-level test keys (``engine.testing.TEST_KEYS``) these options set."""
        keys = {"test_slide_csv": os.fspath(self.test_slide_csv),
                "test_output_csv": os.fspath(self.test_output_csv),
                "feature_root": None if self.feature_root is None else os.fspath(self.feature_root),
                "feature_template": self.feature_template, "test_batch_size": self.batch_size,
                "max_new_tokens": self.max_new_tokens, "overwrite": True if self.overwrite else None,
                "test_task": self.task, "max_prompt_tokens": self.max_prompt_tokens,
                "prefix_reuse": self.prefix_reuse}
        return {k: v for k, v in keys.items() if v is not None}

    def config_options(self) -> Dict[str, Any]:
        """``--cfg-options``, with ``--compat`` as ``model.compat``."""
        opts = dict(self.cfg_options)
        if self.compat is not None:
            opts["model.compat"] = self.compat
        return opts


@dataclass(frozen=True)
class TestInputs:
    """The checked inputs of a run: its settings and its question table, read once."""

    settings: TestSettings
    table: SlideBenchTable
    __test__ = False  # not a pytest test class


def check_test_inputs(cfg: Mapping[str, Any]) -> TestInputs:
    """The test's inputs and output, checked before the model is built (minutes at 7B): the question
    CSV (readable, its task's columns), the feature folder and template (and that some row's features
    are there: a wrong ``feature_root`` is one line now, not N error rows later; that they come from one
    encoder, of the model's ``feature_dim``), the output path."""
    s = TestSettings.from_cfg(cfg)
    table = read_slidebench(s.test_slide_csv, kind=s.task)
    require_file_path(s.test_output_csv, "--test_output_csv")
    if s.feature_root is not None:
        if not s.feature_root.is_dir():
            raise SlideChatError("feature_root is not a folder", s.feature_root,
                                 hint="--feature_root: the folder of the slides' feature files")
        template = s.feature_template or default_template(table.columns)
        check_template(template, table.columns, table.path)
        found = [resolve_feature_path(table.row(i), template, s.feature_root)[0] for i in range(len(table))]
        if len(table) and not any(found):
            raise SlideChatError(f"none of the {len(table)} rows' feature files is there (template "
                                 f"{template!r})", s.feature_root,
                                 hint="check --feature_root / --feature_template")
        check_feature_provenance(found, _model_feature_dim(cfg))
    return TestInputs(s, table)


def _model_feature_dim(cfg: Mapping[str, Any]) -> Optional[int]:
    """The config's (or the exported folder's, merged in by then) ``slidechat_config.feature_dim``."""
    slide_cfg = (cfg.get("model") or {}).get("slidechat_config") or {}
    dim = slide_cfg.get("feature_dim")
    return dim if isinstance(dim, int) else None


def _test_config(options: TestOptions) -> Any:
    """The config as the run sees it: ``--cfg-options``, the test keys, the checkpoint's overrides; it
    must hold the SlideBench test section."""
    cfg = load_config(options.config, options.config_options() or None,
                      trust_remote_code=options.trust_remote_code, allow_partial=options.allow_partial)
    cfg.launcher = options.launcher
    cfg.merge_from_dict(options.test_keys())
    if options.checkpoint is not None:
        cfg.merge_from_dict(checkpoint_overrides(options.checkpoint))
    for key in ("test_dataloader", "test_cfg", "test_evaluator"):
        if cfg.get(key) is None:
            raise SlideChatError(f"config has no {key}: it lacks the SlideBench test section", options.config,
                                 hint="see configs/tiny/stage_1.py, PART 6 (stage 2 extends it)")
    return cfg


def _runner(cfg: Any, options: TestOptions) -> Any:
    route_mmengine_logs_to_stderr()  # stdout: the report only
    return build_runner(cfg, options.config, options.work_dir, options.checkpoint,
                        allow_partial=options.allow_partial)


def build_test_runner(options: TestOptions) -> Any:
    """The mmengine Runner ``xtuner test`` would build, inputs checked first, with the checkpoint loaded
    through the strict key check: a checkpoint without the trained modules is an error before anything
    is generated, unless ``allow_partial``."""
    cfg = _test_config(options)
    check_test_inputs(cfg)  # before the Runner builds the model
    return _runner(cfg, options)


def run_test(options: TestOptions) -> TestReport:
    """Answer a SlideBench CSV with a trained model and score it (the ``slidechat test`` path).

    Returns the report also written to ``<test_output_csv>.report.json/.md``.
    """
    cfg = _test_config(options)
    inputs = check_test_inputs(cfg)  # before the Runner builds the model
    runner = _runner(cfg, options)
    runner.test()
    report = getattr(runner.test_loop, "report", None)
    if report is None:  # another rank, or a loop that did not score
        report = score_output(inputs.settings.test_output_csv, inputs.table.kind, write=False)
    return report

"""Test-only start-up hook (put this folder on PYTHONPATH): every ``AppendOnlyFile.append`` of slidechat
sleeps a little afterwards, so a test that kills a run after its first rows finds the run still going on
any machine, however fast (the kill tests in test_infer.py). Nothing else changes."""

import os
import time

_delay = float(os.environ.get("SLIDECHAT_TEST_APPEND_DELAY", "0.3"))

try:
    from slidechat.utils import resumable as _writers
except Exception:  # not a slidechat process
    _writers = None

if _writers is not None:
    _append = _writers.AppendOnlyFile.append

    def _slow_append(self, data):  # type: ignore[no-untyped-def]
        _append(self, data)
        time.sleep(_delay)

    _writers.AppendOnlyFile.append = _slow_append

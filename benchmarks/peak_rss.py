"""Peak resident memory of this process on Linux, for the benchmarks that measure one step each.

``VmHWM`` (the RSS high-water mark) can be reset to the current RSS by writing 5 to
``/proc/self/clear_refs``, so a child process can measure the peak of one step above what it held before.
"""

from __future__ import annotations


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """VmHWM back to the current RSS: the next peak read is the following work's own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

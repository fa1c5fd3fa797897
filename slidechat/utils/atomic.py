"""Atomic file writes: a reader (or a resumed run) never sees a half-written file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from slidechat.utils.paths import PathLike


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def temp_path_for(final: PathLike) -> Path:
    """A unique temporary name in the final file's folder (same filesystem, so rename is atomic).

    The name starts with ``.`` and ends with ``.partial`` so globs for finished outputs never match it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; finished outputs follow the umask
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(final: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed onto ``final``, on error removed."""
    final = Path(final)
    tmp = temp_path_for(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(final: PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding=encoding)


def save_figure(fig: Any, final: PathLike, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure atomically (PNG unless ``format=`` says otherwise), then close it.

    The format is passed explicitly because the temporary name ends in ``.partial``; closing (also on
    error) keeps a run that plots many slides from piling up open pyplot figures.
    """
    import matplotlib.pyplot as plt

    final = Path(final)
    savefig_kwargs.setdefault("format", "png")
    try:
        with atomic_path(final) as tmp:
            fig.savefig(tmp, **savefig_kwargs)
    finally:
        plt.close(fig)
    return final



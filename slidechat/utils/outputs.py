"""The one output rule of every ``slidechat`` command that writes a folder (``--out``) or a file.

* ``--out`` must name a folder: an empty string (which would mean "the current folder") or an
  existing file is one clear line, not a guess.
* It must be writable, checked up front (before a model is built or a slide is read) with a real
  probe file, so a read-only or mistyped path fails in a second with one line, not with a traceback
  at the end of a long run.
* A folder that already holds files and no output of ours is refused unless the user says
  ``--overwrite`` (and even then only the entries we write are replaced; their other files stay).
  Ours = it holds our marker file :data:`MARKER` (written with every output) or, for outputs of
  earlier versions, the layout the command recognises (``legacy``).
* Model folders are written whole beside the target (a hidden ``.<name>.*.partial`` folder in the
  same parent) and swapped in with renames at the end (:func:`staged_folder`): a crash or kill at any
  point leaves the previous folder as it was, never a mix of old and new parts. Files in the target
  that we did not write are carried over into the new folder, not deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Set

from slidechat.utils.atomic import _UMASK, atomic_write_text
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike
from slidechat.utils.version import __version__

logger = logging.getLogger(__name__)

#: marker file written into every output folder of ours: {"kind", "entries", "slidechat_version"}
MARKER = ".slidechat-output.json"

#: ``legacy(folder)`` -> the entry names an older slidechat wrote there, or ``None`` when not ours
LegacyLayout = Callable[[Path], Optional[Set[str]]]


def require_folder_path(path: Optional[PathLike], flag: str = "--out") -> Path:
    """``path`` as a folder path: empty or an existing non-folder is a one-line error."""
    if path is None or not os.fspath(path).strip():
        raise SlideChatError(f"{flag} is empty: give an output folder path",
                             hint="'.' would write into the current folder; name a folder instead")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SlideChatError(f"{flag} exists and is not a folder", p)
    return p


def require_file_path(path: Optional[PathLike], flag: str) -> Path:
    """``path`` as an output file path: empty or an existing folder is a one-line error; its folder
    must be creatable and writable (checked now, not when the first result is written)."""
    if path is None or not os.fspath(path).strip():
        raise SlideChatError(f"{flag} is empty: give an output file path")
    p = Path(path)
    if p.is_dir():
        raise SlideChatError(f"{flag} is a folder, not a file", p, hint=f"{flag} names the file to write")
    if p.exists() and not os.access(p, os.W_OK):
        raise SlideChatError(f"{flag} is not writable", p)
    check_writable(p.parent, flag=flag)
    return p


def _existing_ancestor(p: Path) -> Path:
    q = p.absolute()
    while not q.exists():
        if q.parent == q:
            break
        q = q.parent
    return q


def check_writable(folder: PathLike, flag: str = "--out") -> None:
    """Prove that ``folder`` (or, when it does not exist yet, the folder that would hold it) can take
    new files: a probe file is created and removed. The probe is what counts (root ignores
    permission bits, a read-only mount does not), ``os.access`` only gives the early clear case."""
    p = Path(folder)
    base = _existing_ancestor(p)
    if not base.is_dir():
        raise SlideChatError(f"cannot create {flag}: {base} is a file, not a folder", p)
    if not os.access(base, os.W_OK | os.X_OK):
        raise SlideChatError(f"{flag} is not writable (no write permission on {base})", p)
    try:
        fd, probe = tempfile.mkstemp(prefix=".slidechat-write-test.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SlideChatError(f"{flag} is not writable: {e.strerror or e}", p) from None


def read_marker(folder: PathLike) -> Optional[Dict[str, object]]:
    """Our marker of ``folder`` (``None`` when absent or unreadable)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(folder: PathLike, kind: str, entries: Optional[List[str]] = None) -> None:
    """Mark ``folder`` as holding our output of ``kind`` (and, for model folders, which entries)."""
    data: Dict[str, object] = {"kind": kind, "slidechat_version": __version__}
    if entries is not None:
        data["entries"] = sorted(entries)
    atomic_write_text(Path(folder) / MARKER, json.dumps(data, indent=1) + "\n")


def _visible_entries(folder: Path) -> List[str]:
    """Entries that make a folder "not empty" (hidden ones such as ``.DS_Store`` do not; they are kept)."""
    return sorted(e for e in os.listdir(folder) if not e.startswith("."))


def our_entries(folder: PathLike, kind: str, legacy: Optional[LegacyLayout] = None) -> Optional[Set[str]]:
    """Entry names of ``folder`` that are our output of ``kind``; ``None`` when the folder is not ours.

    A marker of another kind (say, extracted features where a model is to be exported) is not ours.
    """
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is not None:
        if marker.get("kind") != kind:
            return None
        entries = marker.get("entries")
        return {MARKER, *(entries if isinstance(entries, list) else [])}
    if legacy is not None:
        found = legacy(folder)
        if found is not None:
            return set(found)
    return None


def check_output_folder(path: Optional[PathLike], kind: str, *, overwrite: bool = False,
                        legacy: Optional[LegacyLayout] = None, flag: str = "--out",
                        create: bool = False, refuse_hint: Optional[str] = None) -> Path:
    """The output-folder rule (module doc), checked before any work. Returns the folder path.

    ``create``: make the folder now (commands that write into it as they go, such as extraction);
    model exports leave it to :func:`staged_folder`. ``refuse_hint`` replaces the default advice for a
    non-empty folder that is not ours (commands whose ``--overwrite`` means something else).
    """
    p = require_folder_path(path, flag)
    if p.is_dir() and _visible_entries(p) and not overwrite and our_entries(p, kind, legacy) is None:
        raise SlideChatError(
            f"output folder exists and is not empty, and holds no slidechat {kind} output", p,
            hint=refuse_hint or f"choose a new or empty folder, or pass --overwrite to write the "
                                f"{kind} into it; your other files there are kept")
    check_writable(p, flag)
    if not create:  # a staged folder is written beside the target: its parent must take it too
        check_writable(p.parent, flag)
    if create:
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SlideChatError(f"cannot create the output folder: {e.strerror or e}", p) from None
    return p


# ------------------------------------------------------------------------------ staged folders

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` when the
    system or filesystem cannot, so the caller falls back to two renames."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def _swap_in(new: Path, final: Path, ours: Set[str]) -> None:
    """Replace ``final`` by the complete folder ``new`` (same parent). Entries of ``final`` not in
    ``ours`` and not rewritten by ``new`` (the user's files) are moved into ``new`` first and come
    back on any error; what is left of the old folder is removed only after the swap."""
    if not final.exists():
        os.rename(new, final)
        return
    written = set(os.listdir(new))
    keep = [e for e in os.listdir(final) if e not in ours and e not in written]
    moved: List[str] = []
    try:
        for e in keep:
            os.rename(final / e, new / e)
            moved.append(e)
        if _exchange(new, final):
            old = new  # now holds the previous folder
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.rmdir(old)
            os.rename(final, old)
            try:
                os.rename(new, final)
            except BaseException:
                os.rename(old, final)
                raise
    except BaseException:
        for e in moved:
            with contextlib.suppress(OSError):
                os.rename(new / e, final / e)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(final: PathLike, kind: str, *, overwrite: bool = False,
                  legacy: Optional[LegacyLayout] = None, flag: str = "--out") -> Iterator[Path]:
    """Yield an empty hidden folder beside ``final`` to write a complete output into; on success it is
    marked as ours and swapped in for ``final`` (see :func:`_swap_in`), on error removed, leaving
    ``final`` untouched. The output-folder rule is checked again here (the folder may have changed
    while the model was being built)."""
    final = check_output_folder(final, kind, overwrite=overwrite, legacy=legacy, flag=flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; the finished folder follows the umask
    written: Set[str] = set()
    try:
        yield tmp
        written = set(os.listdir(tmp)) - {MARKER}
        write_marker(tmp, kind, entries=sorted(written))
        ours = (our_entries(final, kind, legacy) or set()) if final.is_dir() else set()
        _swap_in(tmp, final, ours)
    except BaseException:
        stray = set(os.listdir(tmp)) - written - {MARKER} if written and tmp.is_dir() else set()
        if stray:  # a user's file that could not be moved back: never delete it
            logger.error("%s: could not finish; files of %s are still in %s (%s)", final, final, tmp,
                         ", ".join(sorted(stray)))
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

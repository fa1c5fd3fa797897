"""LLaMA-Factory datasets (``dataset_info.json`` + sharegpt JSON/JSONL) -> checked :class:`Example` rows.

One reader for every model family: CytoChat's Qwen2-VL (images are fields of view) and the slide model
(the "images" are feature files, H5/CSV). It follows LLaMA-Factory's rules (``data/parser.py``,
``data/converter.py`` at the commit CytoChat pins):

* ``dataset`` is a comma-separated list of names registered in ``<dataset_dir>/dataset_info.json``
  (``file_name``, ``formatting: sharegpt``, ``columns``, ``tags``), or a path to a JSON/JSONL file.
  Registry defaults are LLaMA-Factory's: messages column ``conversations``, tags ``from``/``value``/
  ``human``/``gpt``/``system``, no images column unless ``columns.images`` names one. A file given
  directly has its spelling detected from the first row (``messages`` -> role/content/user/assistant,
  ``conversations`` -> from/value/human/gpt) and uses an ``images`` column when present.
* A leading message with the system tag becomes the system prompt (else the ``system`` column if set);
  then user and assistant turns alternate, starting with the user; the last turn is the assistant's
  answer (the label).
* The number of ``<image>`` placeholders equals ``len(images)``; relative image paths resolve against
  ``dataset_dir`` (LLaMA-Factory's ``media_dir`` default; a path missing there but present relative to
  the working directory is used with a warning, as LLaMA-Factory does).
* ``max_samples`` keeps the first rows of each dataset file, before conversion, as LLaMA-Factory does.

Unlike LLaMA-Factory, which drops a malformed row with a warning, a bad row (bad JSON, wrong roles,
empty answer, placeholder count mismatch, missing or unreadable image) raises a
:class:`SlideChatError` naming the file and the row; with ``skip_bad=True`` it is skipped, logged and
counted (``ExampleList.num_skipped`` / ``.skipped``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from slidechat.utils.errors import SlideChatError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

DATA_CONFIG = "dataset_info.json"
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
AUDIO_PLACEHOLDER = "<audio>"
FILE_SUFFIXES = (".json", ".jsonl")
#: what to do about a dataset name nothing registers (the flag is ``dataset_dir=`` in a training config)
DATASET_DIR_HINT = (f"pass --dataset_dir DIR, the folder whose {DATA_CONFIG} registers the name "
                    "(dataset_dir= in a config), or the path of a .json/.jsonl file")

ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT = "system", "user", "assistant"


@dataclass
class Example:
    """One conversation row, normalised: roles ``system``/``user``/``assistant``, keys ``role``/``content``.

    ``messages`` holds the user/assistant turns (the system prompt is in ``system``); ``images`` are
    resolved paths in the order of the ``<image>`` placeholders.
    """

    index: int
    id: Optional[str]
    messages: List[Dict[str, str]]
    images: List[Path]
    system: Optional[str]
    source: Path
    dataset: str

    @property
    def label(self) -> Optional[str]:
        """The final assistant answer (None when the row ends with a user turn)."""
        if self.messages and self.messages[-1]["role"] == ROLE_ASSISTANT:
            return self.messages[-1]["content"]
        return None

    @property
    def prompt_messages(self) -> List[Dict[str, str]]:
        """Every turn before the final answer (what a model is asked at inference)."""
        return self.messages[:-1] if self.label is not None else list(self.messages)

    @property
    def name(self) -> str:
        """``<file> row N (id X)`` for messages."""
        rid = f" (id {self.id})" if self.id is not None else ""
        return f"{self.source} row {self.index}{rid}"


class ExampleList(list):
    """A list of :class:`Example` that also reports what ``skip_bad`` dropped."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.skipped: List[str] = []

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


@dataclass
class DatasetSpec:
    """One ``dataset_info.json`` entry (the attributes a local sharegpt dataset uses)."""

    name: str
    file_name: str
    formatting: str = "sharegpt"
    messages: str = "conversations"
    system: Optional[str] = None
    images: Optional[str] = None
    videos: Optional[str] = None
    audios: Optional[str] = None
    tools: Optional[str] = None
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    system_tag: Optional[str] = "system"
    extra: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_info(cls, name: str, entry: Any, info_path: Path) -> "DatasetSpec":
        if not isinstance(entry, dict):
            raise SlideChatError(f"dataset '{name}': entry must be an object", info_path)
        for remote in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"):
            if remote in entry:
                raise SlideChatError(f"dataset '{name}': '{remote}' datasets are not supported (local "
                                     f"files only: use 'file_name')", info_path)
        if "file_name" not in entry:
            raise SlideChatError(f"dataset '{name}': no 'file_name'", info_path)
        formatting = entry.get("formatting", "alpaca")
        if formatting != "sharegpt":
            raise SlideChatError(f"dataset '{name}': formatting '{formatting}' is not supported (only "
                                 f"'sharegpt'; LLaMA-Factory's default is 'alpaca', so set it explicitly)",
                                 info_path)
        if entry.get("ranking"):
            raise SlideChatError(f"dataset '{name}': ranking (preference) datasets are not supported",
                                 info_path)
        if entry.get("num_samples") is not None:
            raise SlideChatError(f"dataset '{name}': 'num_samples' (random resampling) is not supported",
                                 info_path, hint="use max_samples, or subsample the file")
        spec = cls(name=name, file_name=str(entry["file_name"]), formatting=formatting,
                   extra={k: v for k, v in entry.items() if k not in ("columns", "tags")})
        # LLaMA-Factory's DatasetAttr.join: when "columns" / "tags" is given, every attribute of that group
        # takes the listed value or None (unlisted ones are reset, not kept at their defaults)
        for key, group in (("columns", ("messages", "system", "images", "videos", "audios", "tools")),
                           ("tags", ("role_tag", "content_tag", "user_tag", "assistant_tag",
                                     "observation_tag", "function_tag", "system_tag"))):
            if key not in entry:
                continue
            section = entry[key]
            if not isinstance(section, dict):
                raise SlideChatError(f"dataset '{name}': '{key}' must be an object", info_path)
            for attr in group:
                setattr(spec, attr, section.get(attr))
        for attr, key in (("messages", "columns"), ("role_tag", "tags"), ("content_tag", "tags"),
                          ("user_tag", "tags"), ("assistant_tag", "tags")):
            if not isinstance(getattr(spec, attr), str) or not getattr(spec, attr):
                raise SlideChatError(f"dataset '{name}': {key}.{attr} must be given (a non-empty string; "
                                     f"LLaMA-Factory resets unlisted {key} to None)", info_path)
        return spec


def load_dataset_info(dataset_dir: PathLike) -> Dict[str, Any]:
    """The raw ``dataset_info.json`` of ``dataset_dir`` (a SlideChatError naming it when unreadable)."""
    path = Path(dataset_dir) / DATA_CONFIG
    if not path.is_file():
        raise SlideChatError(f"no {DATA_CONFIG} in the dataset dir", Path(dataset_dir))
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlideChatError(f"malformed JSON: {e}", path) from None
    if not isinstance(info, dict):
        raise SlideChatError("expected an object mapping dataset names to entries", path)
    return info


def _spec_for_file(path: Path, first_row: Any) -> DatasetSpec:
    """Spelling of a dataset file given directly (no registry entry)."""
    if isinstance(first_row, dict) and "messages" in first_row and "conversations" not in first_row:
        spec = DatasetSpec(name=str(path), file_name=str(path), messages="messages", role_tag="role",
                           content_tag="content", user_tag="user", assistant_tag="assistant")
    else:
        spec = DatasetSpec(name=str(path), file_name=str(path))
    if isinstance(first_row, dict):
        if "images" in first_row:
            spec.images = "images"
        if "system" in first_row and isinstance(first_row["system"], str):
            spec.system = "system"
    return spec


# ---------------------------------------------------------------------------------------------- files
RawRow = Tuple[int, Optional[int], Any, Optional[str]]  # (row index, line number, value, parse error)


def read_raw_rows(path: Path, kind: str = "dataset file") -> List[RawRow]:
    """Rows of a JSON list or JSONL file; a JSONL line that does not parse becomes a row with an error.

    The one reader for LLaMA-Factory and SlideChat training files: callers decide whether a bad line
    is skipped or fatal; ``kind`` names the file in the not-found error.
    """
    if not path.is_file():
        raise SlideChatError(f"{kind} not found", path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SlideChatError(f"not UTF-8 text: {e}", path) from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise SlideChatError(f"malformed JSON (line {e.lineno}): {e.msg}", path) from None
        return [(i, None, r, None) for i, r in enumerate(rows)]
    out: List[RawRow] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((len(out), lineno, json.loads(line), None))
        except json.JSONDecodeError as e:
            out.append((len(out), lineno, None, f"malformed JSON: {e.msg} (column {e.colno})"))
    if not out:
        raise SlideChatError("no rows (expected a JSON list or JSON lines)", path)
    return out


def _dataset_files(spec: DatasetSpec, dataset_dir: Path, info_path: Path) -> List[Path]:
    local = Path(spec.file_name)
    if not local.is_absolute():
        local = dataset_dir / local
    if local.is_dir():
        files = sorted(p for p in local.iterdir() if p.is_file() and not p.name.startswith("."))
        bad = [p.name for p in files if p.suffix.lower() not in FILE_SUFFIXES]
        if bad:
            raise SlideChatError(f"dataset '{spec.name}': unsupported files {bad[:5]} (only "
                                 f"{', '.join(FILE_SUFFIXES)})", local)
        if not files:
            raise SlideChatError(f"dataset '{spec.name}': folder holds no data files", local)
        return files
    if not local.is_file():
        raise SlideChatError(f"dataset '{spec.name}': file not found: {local}", info_path)
    if local.suffix.lower() not in FILE_SUFFIXES:
        raise SlideChatError(f"dataset '{spec.name}': unsupported file type '{local.suffix}' (only "
                             f"{', '.join(FILE_SUFFIXES)})", local)
    return [local]


# ---------------------------------------------------------------------------------------------- rows
class _RowError(Exception):
    pass


def _resolve_media(value: str, dataset_dir: Path) -> Path:
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    under = dataset_dir / p
    if under.exists() or not p.exists():
        return under
    logger.warning("image %s is not under the dataset dir %s; using it relative to the working "
                   "directory (as LLaMA-Factory does)", value, dataset_dir)
    return p.resolve()


def convert_row(raw: Any, spec: DatasetSpec, dataset_dir: Path, *, check_images: bool = True,
                require_answer: bool = True, check_image: Optional[Callable[[Path], None]] = None
                ) -> Tuple[Optional[str], List[Dict[str, str]], List[Path], Optional[str]]:
    """``(id, messages, images, system)`` of one raw row; raises ``_RowError(reason)``."""
    if not isinstance(raw, dict):
        raise _RowError(f"expected an object, got {type(raw).__name__}")
    rid = raw.get("id")
    rid = None if rid is None else str(rid)
    if spec.messages not in raw:
        alt = "messages" if spec.messages != "messages" and "messages" in raw else (
            "conversations" if spec.messages != "conversations" and "conversations" in raw else None)
        hint = f" (the row has '{alt}': set columns.messages / tags in {DATA_CONFIG})" if alt else ""
        raise _RowError(f"no '{spec.messages}' column{hint}")
    msgs = raw[spec.messages]
    if not isinstance(msgs, list) or not msgs:
        raise _RowError(f"'{spec.messages}' must be a non-empty list")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or spec.role_tag not in m or spec.content_tag not in m:
            keys = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise _RowError(f"message {j} needs '{spec.role_tag}' and '{spec.content_tag}' keys "
                            f"(has {keys}; check the tags in {DATA_CONFIG})")
        if not isinstance(m[spec.content_tag], str):
            raise _RowError(f"message {j}: '{spec.content_tag}' must be a string")
    system: Optional[str] = None
    if spec.system_tag and msgs[0][spec.role_tag] == spec.system_tag:
        system = msgs[0][spec.content_tag]
        msgs = msgs[1:]
    elif spec.system:
        value = raw.get(spec.system)
        if value is not None and not isinstance(value, str):
            raise _RowError(f"'{spec.system}' must be a string")
        system = value or None
    messages: List[Dict[str, str]] = []
    for j, m in enumerate(msgs):
        role = m[spec.role_tag]
        want = spec.user_tag if j % 2 == 0 else spec.assistant_tag
        if role in (spec.observation_tag, spec.function_tag):
            raise _RowError(f"turn {j}: tool turns ('{role}') are not supported")
        if role != want:
            hint = ""
            if j == 0 and role == "system" and not spec.system_tag:
                hint = f"; a system message needs tags.system_tag in {DATA_CONFIG}"
            raise _RowError(f"turn {j}: role '{role}' where '{want}' was expected (turns must alternate "
                            f"{spec.user_tag}/{spec.assistant_tag}, starting with {spec.user_tag}{hint})")
        content = m[spec.content_tag]
        if j % 2 == 1 and not content.strip() and (require_answer or j != len(msgs) - 1):
            raise _RowError(f"turn {j}: empty answer")
        messages.append({"role": ROLE_USER if j % 2 == 0 else ROLE_ASSISTANT, "content": content})
    if not messages:
        raise _RowError("no user turn")
    if require_answer and messages[-1]["role"] != ROLE_ASSISTANT:
        raise _RowError("the last turn must be the assistant's answer (even number of turns)")
    for col, ph in ((spec.videos, VIDEO_PLACEHOLDER), (spec.audios, AUDIO_PLACEHOLDER)):
        n = sum(m["content"].count(ph) for m in messages)
        if n or (col and raw.get(col)):
            raise _RowError(f"{ph[1:-1]} inputs are not supported")
    images_raw: Any = raw.get(spec.images) if spec.images else None
    if images_raw is None or images_raw == []:
        images_raw = []
    elif isinstance(images_raw, str):
        images_raw = [images_raw]
    elif not isinstance(images_raw, list) or not all(isinstance(x, str) and x for x in images_raw):
        raise _RowError(f"'{spec.images}' must be a list of path strings")
    n_ph = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if n_ph != len(images_raw):
        extra = ""
        if n_ph and not spec.images:
            extra = f" (no images column configured: add \"images\" to columns in {DATA_CONFIG})"
        raise _RowError(f"{n_ph} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images_raw)} image(s){extra}")
    images = [_resolve_media(x, dataset_dir) for x in images_raw]
    if check_images:
        for k, p in enumerate(images):
            try:
                (check_image or _default_check_image)(p)
            except SlideChatError as e:
                raise _RowError(f"image {k} ({images_raw[k]}): {e.reason}") from None
    return rid, messages, images, system


def _default_check_image(path: Path) -> None:
    from slidechat.data.images import check_image_header

    check_image_header(path)


def _row_label(index: int, lineno: Optional[int], raw: Any) -> str:
    rid = raw.get("id") if isinstance(raw, dict) else None
    parts = f"row {index}"
    if lineno is not None and lineno != index + 1:
        parts += f" (line {lineno})"
    if rid is not None:
        parts += f" (id {rid})"
    return parts


def read_dataset_file(path: Path, spec: Optional[DatasetSpec], dataset_dir: Path, dataset_name: str,
                      out: ExampleList, *, skip_bad: bool, check_images: bool, max_samples: Optional[int],
                      require_answer: bool = True, check_image: Optional[Callable[[Path], None]] = None
                      ) -> None:
    """Append the rows of one file to ``out`` (bad rows raise, or are recorded in ``out.skipped``)."""
    raw_rows = read_raw_rows(path)
    if max_samples is not None:
        raw_rows = raw_rows[:max_samples]
    if spec is None:
        first = next((r for _, _, r, err in raw_rows if err is None), None)
        spec = _spec_for_file(path, first)
    for index, lineno, raw, parse_error in raw_rows:
        try:
            if parse_error is not None:
                raise _RowError(parse_error)
            rid, messages, images, system = convert_row(raw, spec, dataset_dir, check_images=check_images,
                                                        require_answer=require_answer,
                                                        check_image=check_image)
        except _RowError as e:
            err = SlideChatError(f"{_row_label(index, lineno, raw)}: {e}", path)
            if not skip_bad:
                raise err from None
            out.skipped.append(str(err))
            logger.warning("skipping bad row: %s", err)
            continue
        out.append(Example(index=index, id=rid, messages=messages, images=images, system=system,
                           source=path, dataset=dataset_name))


def read_llamafactory(dataset: str, dataset_dir: Optional[PathLike] = None, *, skip_bad: bool = False,
                      check_images: bool = True, max_samples: Optional[int] = None,
                      require_answer: bool = True,
                      check_image: Optional[Callable[[Path], None]] = None) -> ExampleList:
    """Read LLaMA-Factory sharegpt datasets (registry names or file paths, comma-separated).

    ``require_answer=False`` accepts rows whose last turn is the user's (or an empty final answer),
    for prediction-only data. ``check_image`` replaces the image check (the slide model passes a
    feature-file check); ``check_images=False`` skips it.
    """
    if not isinstance(dataset, str) or not dataset.strip():
        raise SlideChatError("no dataset given")
    if max_samples is not None and max_samples < 1:
        raise SlideChatError(f"max_samples must be >= 1, got {max_samples}")
    ddir = Path(dataset_dir) if dataset_dir is not None else None
    info: Optional[Dict[str, Any]] = None
    info_path = (ddir / DATA_CONFIG) if ddir is not None else None
    if info_path is not None and info_path.is_file():
        info = load_dataset_info(ddir)
    out = ExampleList()
    for name in [n.strip() for n in dataset.split(",") if n.strip()]:
        if info is not None and name in info:
            spec = DatasetSpec.from_info(name, info[name], info_path)
            for f in _dataset_files(spec, ddir, info_path):
                read_dataset_file(f, spec, ddir, name, out, skip_bad=skip_bad, check_images=check_images,
                                  max_samples=max_samples, require_answer=require_answer,
                                  check_image=check_image)
            continue
        direct = Path(name).expanduser()
        if not direct.is_absolute() and not direct.is_file() and ddir is not None:
            direct = ddir / direct
        if direct.is_file() and direct.suffix.lower() in FILE_SUFFIXES:
            base = ddir if ddir is not None else direct.parent
            read_dataset_file(direct, None, base, name, out, skip_bad=skip_bad, check_images=check_images,
                              max_samples=max_samples, require_answer=require_answer,
                              check_image=check_image)
            continue
        if direct.suffix.lower() in FILE_SUFFIXES:
            raise SlideChatError("dataset file not found", direct,
                                 hint=f"or pass --dataset_dir DIR, the folder {name!r} is under")
        if info is not None:
            known = ", ".join(sorted(info)) or "none"
            raise SlideChatError(f"dataset '{name}' is not registered (known: {known}) and is not a "
                                 f"JSON/JSONL file", info_path, hint=DATASET_DIR_HINT)
        where = f"no {DATA_CONFIG} in {ddir}" if ddir is not None else "no --dataset_dir given"
        raise SlideChatError(f"dataset '{name}' is not a JSON/JSONL file and nothing registers it ({where})",
                             hint=DATASET_DIR_HINT)
    if out.num_skipped:
        logger.warning("%s: skipped %d bad row(s), kept %d", dataset, out.num_skipped, len(out))
    if not out:
        raise SlideChatError(f"dataset '{dataset}': no usable rows"
                             + (f" ({out.num_skipped} skipped)" if out.num_skipped else ""))
    return out

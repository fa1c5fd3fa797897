"""LLaMA-Factory datasets (``dataset_info.json`` + JSON/JSONL files) -> checked :class:`Example` rows.

One reader for every model family: CytoChat's Qwen2-VL (images are fields of view) and the slide model
(the "images" are feature files, H5/CSV). It follows LLaMA-Factory's rules (``data/parser.py``,
``data/converter.py``, ``data/loader.py``, ``data/processor/*.py``, ``data/template.py`` and
``data/tool_utils.py`` at the commit CytoChat pins, 5afa851):

* ``dataset`` is a comma-separated list of names registered in ``<dataset_dir>/dataset_info.json``
  (``file_name``, ``formatting``, ``columns``, ``tags``), or a path to a JSON/JSONL file.
  ``formatting`` is ``alpaca`` (LLaMA-Factory's default: ``instruction``/``input``/``output`` columns,
  optional ``system``, ``history`` = [[question, answer], ...], ``images``), ``sharegpt`` (messages
  with role/content tags, defaults ``conversations``/``from``/``value``/``human``/``gpt``/``system``) or
  ``openai`` (LLaMA-Factory's ``OpenAIDatasetConverter``, which also rewrites the system prompt: see
  :func:`_openai_system`). When ``columns`` / ``tags`` is given, every unlisted attribute of that group
  is None (``DatasetAttr.join``). A file given directly has its spelling detected from the first row.
* ``ranking: true`` and ``columns.kto_tag`` datasets are refused (preference / KTO data, not SFT).
* A leading message with the system tag becomes the system prompt (else the ``system`` column); a
  ``tools`` column (a JSON list of function descriptions) is appended to the system prompt with the
  ``qwen2_vl`` template's tool format (:func:`qwen_tools_text`, :meth:`Example.system_prompt`).
* Rows LLaMA-Factory drops (a role out of order, e.g. a system message without ``system_tag``; a
  conversation ending with a user turn; no messages; an alpaca row without an answer in training) are
  errors naming the file and row, unless ``lf_rules=True`` (``slidechat infer --skip_bad``): then they
  are dropped and counted, and an empty answer (which LLaMA-Factory keeps) is kept. Other bad rows
  (bad JSON, tool turns, placeholder count mismatch, missing or unreadable image) are errors, or are
  skipped and counted with ``skip_bad=True``. One log line gives the counts per reason.
* The number of ``<image>`` placeholders equals ``len(images)``; relative image paths resolve against
  ``media_dir`` (default ``dataset_dir``, as LLaMA-Factory; a path missing there but present relative
  to the working directory is used with a warning, as LLaMA-Factory does).
* A folder ``file_name`` reads every file of the folder in ``os.listdir`` order (LLaMA-Factory's
  ``data_files``; all must be JSON/JSONL, hidden files included, or LLaMA-Factory refuses the folder);
  ``max_samples`` keeps the first rows of each registered dataset (all its files together), before
  conversion, as ``loader._load_single_dataset`` does.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from slidechat.data.images import check_image_header
from slidechat.data.template import get_vision_template
from slidechat.utils.errors import SlideChatError
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)

DATA_CONFIG = "dataset_info.json"
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
AUDIO_PLACEHOLDER = "<audio>"
FILE_SUFFIXES = (".json", ".jsonl")
#: what to do about a dataset name nothing registers (the flag is ``dataset_dir=`` in a training config)
DATASET_DIR_HINT = (f"pass --dataset_dir DIR, the folder whose {DATA_CONFIG} registers the name "
                    "(dataset_dir= in a config), or the path of a .json/.jsonl file")

ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT = "system", "user", "assistant"


FORMATTINGS = ("alpaca", "sharegpt", "openai")
#: the error hint of a row LLaMA-Factory drops, keeps, or that is bad: the switches that change it
SKIP_BAD_HINT = ("slidechat infer --skip_bad, or lf_rules=True with skip_bad=True in a config, follows "
                 "LLaMA-Factory: drops the rows it drops, keeps empty answers, skips bad rows, counts them")
#: LLaMA-Factory's ``OpenAIDatasetConverter`` (5afa851) adds this to the system prompt of rows without tools
OPENAI_SHORT_SYSTEM = "detailed thinking off"

# count categories (the one log line): rows LLaMA-Factory drops, and rows it cannot read or we cannot
DROP_ROLE = "role out of order"
DROP_SYSTEM = "system message without system_tag"
DROP_ODD = "ending with a user turn"
DROP_EMPTY = "no messages"
DROP_NO_ANSWER = "no answer"
BAD_ROW = "bad row"


@dataclass
class Example:
    """One conversation row, normalised: roles ``system``/``user``/``assistant``, keys ``role``/``content``.

    ``messages`` holds the user/assistant turns (the system prompt is in ``system``); ``images`` are
    resolved paths in the order of the ``<image>`` placeholders; ``tools`` is the row's tool description
    (a JSON list, as text) or None. Use :meth:`system_prompt` for the system text the model reads.
    """

    index: int
    id: Optional[str]
    messages: List[Dict[str, str]]
    images: List[Path]
    system: Optional[str]
    source: Path
    dataset: str
    tools: Optional[str] = None

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

    def system_prompt(self, default_system: Optional[str] = None, template: Any = None) -> Optional[str]:
        """The row's system prompt with its tools, as the ``qwen2_vl`` (or ``template``'s) template writes it.

        LLaMA-Factory's ``Template._encode``: ``system or default_system``, then the tool description
        appended (``format_tools``, the ``qwen`` tool format). Without tools this is ``system`` itself
        (the template applies the default); with tools the default is resolved here (``default_system``,
        else the template's), because the tool text must follow it.
        """
        if not self.tools:
            return self.system
        tpl = get_vision_template(template if template is not None else "qwen2_vl")
        return (self.system or default_system or tpl.default_system) + qwen_tools_text(self.tools)


# LLaMA-Factory data/tool_utils.py, QWEN_TOOL_PROMPT (the text the qwen / qwen2_vl templates append to the
# system prompt; ``{tools}`` is one "\n" + JSON line per function)
QWEN_TOOLS_HEAD = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                   "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
QWEN_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and "
                   "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                   '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def qwen_tools_text(tools: str) -> str:
    """The ``qwen`` tool format of a JSON list of functions (LLaMA-Factory ``QwenToolUtils.tool_formatter``
    at 5afa851: a function not already ``{"type": "function", ...}`` is wrapped as one); "" for []."""
    funcs = json.loads(tools)
    if not funcs:
        return ""
    lines = "".join("\n" + json.dumps(f if f.get("type") == "function" else {"type": "function", "function": f},
                                      ensure_ascii=False) for f in funcs)
    return QWEN_TOOLS_HEAD + lines + QWEN_TOOLS_TAIL


class ExampleList(list):
    """A list of :class:`Example` that also reports what was dropped, skipped or kept, per reason."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.skipped: List[str] = []  # one "<file>: row N: reason" per row left out
        self.counts: Dict[str, int] = {}  # rows left out per reason (DROP_* / BAD_ROW)
        self.kept_empty_answers = 0  # rows with an empty answer kept (lf_rules)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        """``dropped 3 of 10 rows (2 ending with a user turn, 1 bad row); kept 7 (1 with an empty answer)``."""
        total = len(self) + self.num_skipped
        parts = ", ".join(f"{n} {why}" for why, n in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        text = f"dropped {self.num_skipped} of {total} rows" + (f" ({parts})" if parts else "")
        text += f"; kept {len(self)}"
        if self.kept_empty_answers:
            text += f" ({self.kept_empty_answers} with an empty answer)"
        return text


@dataclass
class DatasetSpec:
    """One ``dataset_info.json`` entry (the attributes a local dataset uses; LLaMA-Factory ``DatasetAttr``)."""

    name: str
    file_name: str
    formatting: str = "sharegpt"
    # alpaca columns
    prompt: Optional[str] = "instruction"
    query: Optional[str] = "input"
    response: Optional[str] = "output"
    history: Optional[str] = None
    # sharegpt / openai columns and tags
    messages: Optional[str] = "conversations"
    system: Optional[str] = None
    images: Optional[str] = None
    videos: Optional[str] = None
    audios: Optional[str] = None
    tools: Optional[str] = None
    role_tag: Optional[str] = "from"
    content_tag: Optional[str] = "value"
    user_tag: Optional[str] = "human"
    assistant_tag: Optional[str] = "gpt"
    observation_tag: Optional[str] = "observation"
    function_tag: Optional[str] = "function_call"
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
        if formatting not in FORMATTINGS:
            raise SlideChatError(f"dataset '{name}': unknown formatting '{formatting}' (LLaMA-Factory's "
                                 f"converters: {', '.join(FORMATTINGS)})", info_path)
        if entry.get("ranking"):
            raise SlideChatError(f"dataset '{name}': a ranking (preference) dataset is for reward modelling "
                                 f"or DPO, not SFT or prediction (LLaMA-Factory refuses it outside stage rm)",
                                 info_path)
        columns = entry.get("columns")
        if isinstance(columns, dict) and columns.get("kto_tag"):
            raise SlideChatError(f"dataset '{name}': a KTO dataset (columns.kto_tag '{columns['kto_tag']}'): "
                                 f"its answers are labelled desirable or not, so SFT would also learn the "
                                 f"undesirable ones (LLaMA-Factory drops every such row outside stage kto)",
                                 info_path)
        if entry.get("num_samples") is not None:
            raise SlideChatError(f"dataset '{name}': 'num_samples' (random resampling) is not supported",
                                 info_path, hint="use max_samples, or subsample the file")
        spec = cls(name=name, file_name=str(entry["file_name"]), formatting=formatting,
                   extra={k: v for k, v in entry.items() if k not in ("columns", "tags")})
        # LLaMA-Factory's DatasetAttr.join: when "columns" / "tags" is given, every attribute of that group
        # takes the listed value or None (unlisted ones are reset, not kept at their defaults)
        for key, group in (("columns", ("prompt", "query", "response", "history", "messages", "system",
                                        "images", "videos", "audios", "tools")),
                           ("tags", ("role_tag", "content_tag", "user_tag", "assistant_tag",
                                     "observation_tag", "function_tag", "system_tag"))):
            if key not in entry:
                continue
            section = entry[key]
            if not isinstance(section, dict):
                raise SlideChatError(f"dataset '{name}': '{key}' must be an object", info_path)
            for attr in group:
                setattr(spec, attr, section.get(attr))
        if formatting != "alpaca":
            for attr, key in (("messages", "columns"), ("role_tag", "tags"), ("content_tag", "tags"),
                              ("user_tag", "tags"), ("assistant_tag", "tags")):
                if not isinstance(getattr(spec, attr), str) or not getattr(spec, attr):
                    raise SlideChatError(f"dataset '{name}': {key}.{attr} must be given (a non-empty "
                                         f"string; LLaMA-Factory resets unlisted {key} to None)", info_path)
        if formatting == "openai":
            logger.info("dataset '%s': formatting 'openai' rewrites the system prompt as LLaMA-Factory's "
                        "OpenAIDatasetConverter does ('%s' added to rows without tools)", name,
                        OPENAI_SHORT_SYSTEM)
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
    """Spelling of a dataset file given directly (no registry entry), from its first row: ``messages``
    -> role/content/user/assistant/system tags (LLaMA-Factory's "OpenAI format", a sharegpt case),
    ``conversations`` -> from/value/human/gpt, ``instruction``/``output`` -> alpaca."""
    row = first_row if isinstance(first_row, dict) else {}
    if "chosen" in row and "rejected" in row:
        raise SlideChatError("a ranking (preference) dataset (chosen/rejected columns) is for reward "
                             "modelling or DPO, not SFT or prediction", path)
    if "messages" in row and "conversations" not in row:
        spec = DatasetSpec(name=str(path), file_name=str(path), messages="messages", role_tag="role",
                           content_tag="content", user_tag="user", assistant_tag="assistant")
    elif "conversations" not in row and ("instruction" in row or "output" in row):
        spec = DatasetSpec(name=str(path), file_name=str(path), formatting="alpaca",
                           history="history" if "history" in row else None)
    else:
        spec = DatasetSpec(name=str(path), file_name=str(path))
    if "images" in row:
        spec.images = "images"
    if "tools" in row:
        spec.tools = "tools"
    if "system" in row and isinstance(row["system"], str):
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
    """The files of a registered dataset: the file, or every entry of the folder in ``os.listdir`` order
    (LLaMA-Factory ``loader._load_single_dataset`` passes them in that order as ``data_files``, and
    refuses a folder whose files are not all of one allowed type, hidden files included)."""
    local = Path(spec.file_name)
    if not local.is_absolute():
        local = dataset_dir / local
    if local.is_dir():
        files = [local / n for n in os.listdir(local)]
        bad = [p.name for p in files if not p.is_file() or p.suffix.lower() not in FILE_SUFFIXES]
        if bad:
            raise SlideChatError(f"dataset '{spec.name}': the folder holds entries other than "
                                 f"{'/'.join(FILE_SUFFIXES)} files: {bad[:5]} (LLaMA-Factory refuses it too: "
                                 f"'File types should be identical')", local)
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
    """A row that cannot be used; ``drop`` names LLaMA-Factory's reason when it drops such rows too."""

    def __init__(self, reason: str, drop: Optional[str] = None) -> None:
        super().__init__(reason)
        self.drop = drop


@dataclass
class _Converted:
    id: Optional[str]
    messages: List[Dict[str, str]]
    images: List[Path]
    system: Optional[str]
    tools: Optional[str]
    empty_answer: bool = False


def _resolve_media(value: str, media_dir: Path) -> Path:
    """LLaMA-Factory ``DatasetConverter._find_medias``: ``media_dir/value`` when that file exists, else
    the path as written (relative to the working directory), with a warning."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    under = media_dir / p
    if under.exists() or not p.exists():
        return under
    logger.warning("image %s is not under the media dir %s; using it relative to the working "
                   "directory (as LLaMA-Factory does)", value, media_dir)
    return p.resolve()


def _opt_str(raw: Dict[str, Any], column: Optional[str], what: str) -> str:
    """A string column's value ("" when the column is not configured, absent or null)."""
    value = raw.get(column) if column else None
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _RowError(f"'{column}' ({what}) must be a string, got {type(value).__name__}")
    return value


def _split_system(raw: Dict[str, Any], msgs: List[Any], spec: DatasetSpec) -> Tuple[str, List[Any]]:
    """sharegpt/openai: a leading message with ``system_tag`` is the system prompt, else the column."""
    if spec.system_tag and msgs and msgs[0][spec.role_tag] == spec.system_tag:
        content = msgs[0].get(spec.content_tag)
        if not isinstance(content, str):
            raise _RowError(f"message 0: '{spec.content_tag}' must be a string")
        return content, msgs[1:]
    return _opt_str(raw, spec.system, "system prompt"), msgs


def _messages_column(raw: Dict[str, Any], spec: DatasetSpec) -> List[Any]:
    if spec.messages not in raw:
        alt = "messages" if spec.messages != "messages" and "messages" in raw else (
            "conversations" if spec.messages != "conversations" and "conversations" in raw else None)
        hint = f" (the row has '{alt}': set columns.messages / tags in {DATA_CONFIG})" if alt else ""
        raise _RowError(f"no '{spec.messages}' column{hint}")
    msgs = raw[spec.messages]
    if not isinstance(msgs, list):
        raise _RowError(f"'{spec.messages}' must be a list")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or spec.role_tag not in m:
            keys = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise _RowError(f"message {j} needs '{spec.role_tag}' and '{spec.content_tag}' keys "
                            f"(has {keys}; check the tags in {DATA_CONFIG})")
    return msgs


def _check_roles(roles: List[Optional[str]], spec: DatasetSpec, require_answer: bool) -> None:
    """LLaMA-Factory's converter: turn ``j`` must be user/observation (even j) or assistant/function
    (odd j), else 'Invalid role tag'; an odd number of turns is 'Invalid message count' (the row ends with
    a user turn); both drop the row. No turn at all is dropped by the processors."""
    accept = ((spec.user_tag, spec.observation_tag), (spec.assistant_tag, spec.function_tag))
    for j, role in enumerate(roles):
        if role not in accept[j % 2]:
            want = spec.user_tag if j % 2 == 0 else spec.assistant_tag
            if j == 0 and role == ROLE_SYSTEM and not spec.system_tag:
                raise _RowError(f"turn 0: role 'system' but no tags.system_tag in {DATA_CONFIG}", DROP_SYSTEM)
            raise _RowError(f"turn {j}: role '{role}' where '{want}' was expected (turns must alternate "
                            f"{spec.user_tag}/{spec.assistant_tag}, starting with {spec.user_tag})", DROP_ROLE)
    if not roles:
        raise _RowError("no user turn", DROP_EMPTY)
    if len(roles) % 2 != 0 and require_answer:
        raise _RowError("the last turn must be the assistant's answer (even number of turns)", DROP_ODD)
    tool_roles = (spec.observation_tag, spec.function_tag)
    for j, role in enumerate(roles):
        if role in tool_roles and role not in (spec.user_tag, spec.assistant_tag):
            raise _RowError(f"turn {j}: tool turns ('{role}') are not supported")


def _convert_sharegpt(raw: Dict[str, Any], spec: DatasetSpec, require_answer: bool
                      ) -> Tuple[str, List[Dict[str, Any]], Any]:
    """LLaMA-Factory ``SharegptDatasetConverter``: (system, turns, tools)."""
    system, msgs = _split_system(raw, _messages_column(raw, spec), spec)
    _check_roles([m[spec.role_tag] for m in msgs], spec, require_answer)
    turns = [{"role": ROLE_USER if j % 2 == 0 else ROLE_ASSISTANT, "content": m.get(spec.content_tag)}
             for j, m in enumerate(msgs)]
    return system, turns, raw.get(spec.tools) if spec.tools else None


def _openai_system(system: str, tools: str) -> str:
    """LLaMA-Factory ``OpenAIDatasetConverter`` (5afa851): no system and no tools -> "detailed thinking
    off"; a system without tools gets "\\ndetailed thinking off" unless it already says "detailed thinking
    on/off"; a system with tools gets "\\n"; no system with tools stays "" (the template default)."""
    if not system:
        return system if tools else OPENAI_SHORT_SYSTEM
    if tools:
        return system + "\n"
    if "detailed thinking on" in system or OPENAI_SHORT_SYSTEM in system:
        return system
    return system + "\n" + OPENAI_SHORT_SYSTEM


def _convert_openai(raw: Dict[str, Any], spec: DatasetSpec, require_answer: bool
                    ) -> Tuple[str, List[Dict[str, Any]], Any]:
    """LLaMA-Factory ``OpenAIDatasetConverter``: (system, turns, tools); tool calls and tool responses
    are tool turns (not supported here); a role outside the tags is an error (LLaMA-Factory fails)."""
    system, msgs = _split_system(raw, _messages_column(raw, spec), spec)
    known = {spec.user_tag, spec.assistant_tag, spec.observation_tag, spec.function_tag, spec.system_tag}
    roles = []
    for j, m in enumerate(msgs):
        role = m[spec.role_tag]
        if role in (spec.assistant_tag, spec.function_tag) and m.get("tool_calls"):
            raise _RowError(f"turn {j}: tool turns ('tool_calls') are not supported")
        if role not in known:
            raise _RowError(f"turn {j}: unknown role '{role}' (the tags in {DATA_CONFIG} name "
                            f"{', '.join(sorted(str(k) for k in known if k))})")
        # the converter maps tags to roles, then checks the order on the roles: a system message
        # after the first turn is out of order
        roles.append({spec.user_tag: ROLE_USER, spec.assistant_tag: ROLE_ASSISTANT}.get(role, role))
    generic = DatasetSpec(name=spec.name, file_name=spec.file_name, user_tag=ROLE_USER,
                          assistant_tag=ROLE_ASSISTANT, observation_tag=spec.observation_tag,
                          function_tag=spec.function_tag)
    _check_roles(roles, generic, require_answer)
    tools = raw.get(spec.tools, "") if spec.tools else ""
    if isinstance(tools, (dict, list)):
        tools = json.dumps(tools, ensure_ascii=False)
    turns = [{"role": r, "content": m.get(spec.content_tag)} for r, m in zip(roles, msgs)]
    return _openai_system(system or "", tools or ""), turns, tools


def _convert_alpaca(raw: Dict[str, Any], spec: DatasetSpec, require_answer: bool
                    ) -> Tuple[str, List[Dict[str, Any]], Any]:
    """LLaMA-Factory ``AlpacaDatasetConverter``: each ``history`` pair becomes a user and an assistant
    turn; the question is the non-empty ``instruction`` and ``input`` joined by "\\n"; the answer is
    ``output`` when it is a string, else there is none (the supervised processor drops such a row, the
    prediction one keeps it without a label)."""
    turns: List[Dict[str, Any]] = []
    history = raw.get(spec.history) if spec.history else None
    if isinstance(history, list):
        for k, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise _RowError(f"'{spec.history}' item {k} must be a [question, answer] pair")
            turns += [{"role": ROLE_USER, "content": pair[0]}, {"role": ROLE_ASSISTANT, "content": pair[1]}]
    parts = [v for v in (raw.get(spec.prompt) if spec.prompt else None,
                         raw.get(spec.query) if spec.query else None) if v]
    if not all(isinstance(v, str) for v in parts):
        raise _RowError(f"'{spec.prompt}' and '{spec.query}' must be strings")
    turns.append({"role": ROLE_USER, "content": "\n".join(parts)})
    answer = raw.get(spec.response) if spec.response else None
    if isinstance(answer, str):
        turns.append({"role": ROLE_ASSISTANT, "content": answer})
    elif require_answer:
        raise _RowError(f"no answer ('{spec.response}' is not a string)", DROP_NO_ANSWER)
    return _opt_str(raw, spec.system, "system prompt"), turns, raw.get(spec.tools) if spec.tools else None


def _check_tools(tools: Any, column: Optional[str]) -> Optional[str]:
    """The tool description as LLaMA-Factory's ``ToolFormatter`` reads it: a JSON list of function objects
    as text (None when empty); anything else fails there, so it is a bad row here."""
    if tools is None or tools == "":
        return None
    if not isinstance(tools, str):
        raise _RowError(f"'{column}' (tools) must be a JSON string, got {type(tools).__name__}")
    try:
        funcs = json.loads(tools)
    except json.JSONDecodeError as e:
        raise _RowError(f"'{column}' (tools) is not valid JSON: {e.msg}") from None
    if not isinstance(funcs, list) or not all(isinstance(f, dict) for f in funcs):
        raise _RowError(f"'{column}' (tools) must be a JSON list of function objects")
    return tools if funcs else None


def convert_row(raw: Any, spec: DatasetSpec, media_dir: Path, *, check_images: bool = True,
                require_answer: bool = True, check_image: Optional[Callable[[Path], None]] = None,
                keep_empty_answers: bool = False) -> _Converted:
    """One raw row converted as LLaMA-Factory's converter for ``spec.formatting`` does, then checked;
    raises ``_RowError(reason, drop)`` (``drop``: LLaMA-Factory's reason when it drops the row too)."""
    if not isinstance(raw, dict):
        raise _RowError(f"expected an object, got {type(raw).__name__}")
    rid = raw.get("id")
    rid = None if rid is None else str(rid)
    convert = {"alpaca": _convert_alpaca, "openai": _convert_openai}.get(spec.formatting, _convert_sharegpt)
    system, turns, tools = convert(raw, spec, require_answer)
    for j, m in enumerate(turns):
        if not isinstance(m["content"], str):
            raise _RowError(f"turn {j}: the content must be a string")
    empty = [j for j, m in enumerate(turns) if m["role"] == ROLE_ASSISTANT and not m["content"].strip()
             and (require_answer or j != len(turns) - 1)]
    if empty and not keep_empty_answers:
        raise _RowError(f"turn {empty[0]}: empty answer (LLaMA-Factory keeps such a row)")
    tools_text = _check_tools(tools, spec.tools)
    for col, ph in ((spec.videos, VIDEO_PLACEHOLDER), (spec.audios, AUDIO_PLACEHOLDER)):
        n = sum(m["content"].count(ph) for m in turns)
        if n or (col and raw.get(col)):
            raise _RowError(f"{ph[1:-1]} inputs are not supported")
    images_raw: Any = raw.get(spec.images) if spec.images else None
    if images_raw is None or images_raw == []:
        images_raw = []
    elif isinstance(images_raw, str):
        images_raw = [images_raw]
    elif not isinstance(images_raw, list) or not all(isinstance(x, str) and x for x in images_raw):
        raise _RowError(f"'{spec.images}' must be a list of path strings")
    n_ph = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in turns)
    if n_ph != len(images_raw):
        extra = ""
        if n_ph and not spec.images:
            extra = f" (no images column configured: add \"images\" to columns in {DATA_CONFIG})"
        raise _RowError(f"{n_ph} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images_raw)} image(s){extra}")
    images = [_resolve_media(x, media_dir) for x in images_raw]
    if check_images:
        for k, p in enumerate(images):
            try:
                (check_image or _default_check_image)(p)
            except SlideChatError as e:
                raise _RowError(f"image {k} ({images_raw[k]}): {e.reason}") from None
    return _Converted(rid, turns, images, system or None, tools_text, bool(empty))


def _default_check_image(path: Path) -> None:
    check_image_header(path)


def _row_label(index: int, lineno: Optional[int], raw: Any) -> str:
    rid = raw.get("id") if isinstance(raw, dict) else None
    parts = f"row {index}"
    if lineno is not None and lineno != index + 1:
        parts += f" (line {lineno})"
    if rid is not None:
        parts += f" (id {rid})"
    return parts


def read_dataset_files(paths: List[Path], spec: Optional[DatasetSpec], media_dir: Path, dataset_name: str,
                       out: ExampleList, *, skip_bad: bool, check_images: bool, max_samples: Optional[int],
                       require_answer: bool = True, check_image: Optional[Callable[[Path], None]] = None,
                       lf_rules: bool = False, predict: bool = False) -> None:
    """Append the rows of one dataset (its files in order) to ``out``.

    ``max_samples`` keeps the first rows of the files together (LLaMA-Factory truncates the loaded
    dataset). A row LLaMA-Factory drops raises, or is dropped and counted with ``lf_rules`` (or
    ``skip_bad``); any other bad row raises, or is skipped and counted with ``skip_bad``.
    """
    rows = [(path, r) for path in paths for r in read_raw_rows(path)]
    if max_samples is not None:
        rows = rows[:max_samples]
    if spec is None:
        first = next((r for _, (_, _, r, err) in rows if err is None), None)
        spec = _spec_for_file(paths[0], first)
    if predict and spec.formatting == "alpaca":  # the prediction processor keeps a row without an answer
        require_answer = False
    for path, (index, lineno, raw, parse_error) in rows:
        try:
            if parse_error is not None:
                raise _RowError(parse_error)
            row = convert_row(raw, spec, media_dir, check_images=check_images, require_answer=require_answer,
                              check_image=check_image, keep_empty_answers=lf_rules)
        except _RowError as e:
            err = SlideChatError(f"{_row_label(index, lineno, raw)}: {e}", path)
            dropped_by_lf = e.drop is not None and lf_rules
            if not (dropped_by_lf or skip_bad):
                what = "LLaMA-Factory drops such a row; " if e.drop is not None else ""
                raise SlideChatError(err.reason, path, hint=what + SKIP_BAD_HINT) from None
            reason = e.drop or BAD_ROW
            out.counts[reason] = out.counts.get(reason, 0) + 1
            out.skipped.append(str(err))
            logger.info("%s row: %s", "dropping" if dropped_by_lf else "skipping bad", err)
            continue
        out.kept_empty_answers += row.empty_answer
        out.append(Example(index=index, id=row.id, messages=row.messages, images=row.images, system=row.system,
                           source=path, dataset=dataset_name, tools=row.tools))


def read_llamafactory(dataset: str, dataset_dir: Optional[PathLike] = None, *, skip_bad: bool = False,
                      check_images: bool = True, max_samples: Optional[int] = None,
                      require_answer: bool = True,
                      check_image: Optional[Callable[[Path], None]] = None, lf_rules: bool = False,
                      predict: bool = False, media_dir: Optional[PathLike] = None) -> ExampleList:
    """Read LLaMA-Factory datasets (registry names or file paths, comma-separated).

    ``lf_rules=True`` follows LLaMA-Factory where it drops a row (dropped and counted) or keeps one we
    would refuse (an empty answer); ``skip_bad=True`` also skips (and counts) every other bad row.
    ``predict=True`` reads as LLaMA-Factory's prediction processor (vllm_infer): an alpaca row without
    an answer is kept, unlabelled. ``require_answer=False`` also accepts rows whose last turn is the
    user's (or an empty final answer), for prediction-only data. ``media_dir``: where relative image
    paths resolve (default ``dataset_dir``). ``check_image`` replaces the image check (the slide model
    passes a feature-file check); ``check_images=False`` skips it.
    """
    if not isinstance(dataset, str) or not dataset.strip():
        raise SlideChatError("no dataset given")
    if max_samples is not None and max_samples < 1:
        raise SlideChatError(f"max_samples must be >= 1, got {max_samples}")
    ddir = Path(dataset_dir) if dataset_dir is not None else None
    mdir = Path(media_dir) if media_dir is not None else None
    info: Optional[Dict[str, Any]] = None
    info_path = (ddir / DATA_CONFIG) if ddir is not None else None
    if info_path is not None and info_path.is_file():
        info = load_dataset_info(ddir)
    out = ExampleList()
    kw = dict(skip_bad=skip_bad, check_images=check_images, max_samples=max_samples, check_image=check_image,
              lf_rules=lf_rules, predict=predict, require_answer=require_answer)
    for name in [n.strip() for n in dataset.split(",") if n.strip()]:
        if info is not None and name in info:
            spec = DatasetSpec.from_info(name, info[name], info_path)
            read_dataset_files(_dataset_files(spec, ddir, info_path), spec, mdir or ddir, name, out, **kw)
            continue
        direct = Path(name).expanduser()
        if not direct.is_absolute() and not direct.is_file() and ddir is not None:
            direct = ddir / direct
        if direct.is_file() and direct.suffix.lower() in FILE_SUFFIXES:
            base = mdir or (ddir if ddir is not None else direct.parent)
            read_dataset_files([direct], None, base, name, out, **kw)
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
    if out.num_skipped or out.kept_empty_answers:
        logger.warning("%s: %s", dataset, out.summary())
    if not out:
        raise SlideChatError(f"dataset '{dataset}': no usable rows"
                             + (f" ({out.summary()})" if out.num_skipped else ""))
    return out

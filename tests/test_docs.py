"""The documentation cannot rot: every command in README.md and docs/*.md is checked, some are run.

Static checks, on every fenced ``bash``/``sh``/``shell`` block of every page:

* a line starting with ``slidechat`` is parsed by the real parser (``slidechat.cli.main.build_parser``),
  so every subcommand and flag the docs show exists;
* ``xtuner train|test CONFIG`` and ``slidechat train|test|export CONFIG`` name a config that exists;
  ``python tools/X.py`` / ``bash tools/X.sh`` name a script that exists, and so does every other repo
  path (``configs/``, ``tools/``, ``benchmarks/``, ``dataset/``, ``requirements/``) a command names;
* a command this file does not know (a typo such as ``slidecaht``) is an error;
* every relative link (and its ``#anchor``) resolves to an existing file (and heading).

Blocks preceded by ``<!-- doctest: run; creates: GLOB ...; prints: TEXT -->`` are executed with bash in
a temporary folder holding a copy of ``dataset/`` and links to ``tools/`` and ``configs/`` (so the docs
use repo-relative paths and write under ``work_dirs/``), with ``slidechat`` and ``python`` meaning this
interpreter and this checkout. They must exit 0, create what ``creates:`` lists and print
(on stdout or stderr: logs go to stderr) what ``prints:`` says.
Only cheap examples are marked (synthetic slides, tiny_test extraction, scoring, help): training and the
demo are covered by the parser check here and by their own tests.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
# The pages issue 16 asks for (one per command or topic); more may exist and are checked too.
REQUIRED_PAGES = ("index", "extraction", "encoders", "training", "testing", "cytology", "scoring",
                  "screening", "chat", "formats", "refusals", "benchmarks")
README_MAX_LINES = 250
SHELL_LANGS = {"bash", "sh", "shell"}
# First words a documented command may start with; anything else is reported (a typo, or a tool the
# reader would not have).
KNOWN_COMMANDS = {"slidechat", "xtuner", "python", "python3", ".venv/bin/python", "bash", "source",
                  "pip", "torchrun", "cd", "export", "ls", "cat", "head", "mkdir", "git", "printf", "echo"}
REPO_DIRS = ("configs/", "tools/", "benchmarks/", "dataset/", "requirements/")
CONFIG_COMMANDS = {("xtuner", "train"), ("xtuner", "test"), ("slidechat", "train"),
                   ("slidechat", "test"), ("slidechat", "export")}
RUN_MARK = re.compile(r"^\s*<!--\s*doctest:\s*run\b(?P<opts>.*?)-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)\)|!\[[^\]]*\]\((?P<image>[^)\s]+)\)")
SEPARATORS = {"&&", "||", ";", "|"}
REDIRECTS = {">", ">>", "<", ">&", "&>"}
# Runnable examples the docs must keep: one per cheap capability (a command prefix each).
REQUIRED_RUNS = (("python", "tools/make_synthetic_slides.py"), ("slidechat", "extract-features"),
                 ("python", "tools/make_synthetic_cytology.py"), ("slidechat", "eval", "mcq"),
                 ("slidechat", "eval", "caption"), ("slidechat", "eval", "grounding"),
                 ("slidechat", "eval", "cytology"), ("slidechat", "--help"))


@dataclass
class Block:
    """One fenced code block: where it is, its language, its lines and its doctest marker."""

    path: str
    line: int                      # 1-based line of the block's first content line
    lang: str
    lines: List[str]
    run: bool = False
    creates: List[str] = field(default_factory=list)
    prints: List[str] = field(default_factory=list)


def _marker_options(opts: str) -> Dict[str, List[str]]:
    """``; creates: a b; prints: text`` -> {"creates": ["a", "b"], "prints": ["text"]}."""
    out: Dict[str, List[str]] = {"creates": [], "prints": []}
    for part in opts.split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition(":")
        key = key.strip()
        if not sep or key not in out:
            raise ValueError(f"unknown doctest option {part!r} (creates: GLOBS; prints: TEXT)")
        out[key].extend(value.split() if key == "creates" else [value.strip()])
    return out


def read_blocks(text: str, path: str) -> List[Block]:
    """Fenced blocks of a Markdown text, with the ``<!-- doctest: run ... -->`` marker just above."""
    blocks: List[Block] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m.group("fence"), len(m.group("indent"))
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        mark = RUN_MARK.match(lines[j]) if j >= 0 else None
        body: List[str] = []
        k = i + 1
        while k < len(lines) and not lines[k].strip().startswith(fence):
            body.append(lines[k][indent:] if lines[k][:indent].isspace() else lines[k].lstrip())
            k += 1
        block = Block(path, i + 2, m.group("lang").lower(), body, run=bool(mark))
        if mark:
            opts = _marker_options(mark.group("opts"))
            block.creates, block.prints = opts["creates"], opts["prints"]
        blocks.append(block)
        i = k + 1
    return blocks


def commands(block: Block) -> List[Tuple[int, List[str]]]:
    """The simple commands of a shell block: (line number, words), with backslash continuations
    joined, comments dropped, ``&&``/``||``/``;``/``|`` split and leading ``VAR=value`` removed."""
    out: List[Tuple[int, List[str]]] = []
    pending, start = "", block.line
    for n, line in enumerate(block.lines, start=block.line):
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text, pending = pending + line, ""
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True          # words as the shell splits them; && ; | apart
        try:
            words = list(lexer)
        except ValueError as e:
            out.append((start, ["<unparsable>", str(e), text]))
            continue
        current: List[str] = []
        skip_next = False
        for w in words + [";"]:
            if skip_next:                      # the target of a redirection
                skip_next = False
            elif w in REDIRECTS:
                if current and current[-1].isdigit():
                    current.pop()
                skip_next = True
            elif w in SEPARATORS:
                while current and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", current[0]):
                    current.pop(0)
                if current:
                    out.append((start, current))
                current = []
            else:
                current.append(w)
    return out


@lru_cache(maxsize=1)
def _parser():
    from slidechat.cli.main import build_parser  # the real CLI parser (imports stay light)

    return build_parser()


def _parse_error(argv: Sequence[str]) -> Optional[str]:
    """None when ``slidechat ARGV`` parses (``--help`` included), else argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            _parser().parse_args(list(argv))
    except SystemExit as e:
        if e.code not in (0, None):
            msg = err.getvalue().strip().splitlines()
            return msg[-1] if msg else f"exit {e.code}"
    return None


def check_command(words: List[str]) -> List[str]:
    """Problems with one documented command (empty when it is fine)."""
    head = words[0]
    if head == "<unparsable>":
        return [f"cannot split the line into words ({words[1]}): {words[2]}"]
    problems: List[str] = []
    if head not in KNOWN_COMMANDS:
        problems.append(f"unknown command {head!r} (a typo? known: {', '.join(sorted(KNOWN_COMMANDS))})")
        return problems
    if head == "slidechat":
        err = _parse_error(words[1:])
        if err:
            problems.append(f"`{shlex.join(words)}` is refused by slidechat's parser: {err}")
    if tuple(words[:2]) in CONFIG_COMMANDS:
        config = next((w for w in words[2:] if not w.startswith("-")), None)
        if config is None or not (REPO / config).is_file():
            problems.append(f"`{words[0]} {words[1]}` names config {config!r}, which is not in the repo")
    if head in ("python", "python3", ".venv/bin/python", "bash") and len(words) > 1 \
            and not words[1].startswith("-") and not (REPO / words[1]).is_file():
        problems.append(f"script {words[1]!r} is not in the repo")
    for w in words[1:]:
        for value in (w, w.partition("=")[2]):
            value = value.rstrip(",")
            if value.startswith(REPO_DIRS) and "*" not in value and not (REPO / value).exists() \
                    and not any(repr(value) in p for p in problems):
                problems.append(f"{value!r} is not in the repo")
    return problems


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set:
    """Anchors of a Markdown text's headings (outside code blocks), numbered like GitHub's."""
    seen: Dict[str, int] = {}
    out = set()
    in_code = False
    for line in text.split("\n"):
        if FENCE.match(line):
            in_code = not in_code
            continue
        m = re.match(r"^#{1,6}\s+(.*)", line)
        if m and not in_code:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def check_links(text: str, path: Path) -> List[str]:
    """Problems with the relative links of a Markdown file (outside code blocks)."""
    problems: List[str] = []
    in_code = False
    for n, line in enumerate(text.split("\n"), start=1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        for m in LINK.finditer(line):
            target = m.group("target") or m.group("image")
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):       # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                problems.append(f"{path.name}:{n}: link target {target!r} does not exist")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{path.name}:{n}: link {target!r}: no heading with anchor #{anchor}")
    return problems


def check_markdown(text: str, path: Path) -> List[str]:
    """Every static problem of one Markdown page: commands in shell blocks and relative links."""
    problems: List[str] = []
    for block in read_blocks(text, str(path)):
        if block.lang not in SHELL_LANGS:
            if block.run:
                problems.append(f"{path.name}:{block.line}: a doctest block must be a bash block")
            continue
        for line, words in commands(block):
            problems += [f"{path.name}:{line}: {p}" for p in check_command(words)]
    return problems + check_links(text, path)


def doc_files() -> List[Path]:
    return [REPO / "README.md"] + sorted(DOCS.glob("*.md"))


# ---------------------------------------------------------------------------------------------
# The helpers themselves: they must catch what they are for.


def _doc(tmp_path: Path, body: str) -> Tuple[str, Path]:
    path = tmp_path / "page.md"
    path.write_text(body, encoding="utf-8")
    return body, path


def test_check_catches_a_bogus_flag_and_names_the_line(tmp_path: Path) -> None:
    text, path = _doc(tmp_path, "# Page\n\n```bash\n# a comment\nslidechat extract-features s/ --out o \\\n"
                                "    --encoder tiny_test --no-such-flag\n```\n")
    problems = check_markdown(text, path)
    assert len(problems) == 1, problems
    assert problems[0].startswith("page.md:5:") and "--no-such-flag" in problems[0]


def test_check_catches_unknown_subcommands_configs_scripts_and_commands(tmp_path: Path) -> None:
    text, path = _doc(tmp_path, "```bash\nslidechat extract --out o x\n"
                                "xtuner train configs/slidechat/no_such_stage.py --work-dir w\n"
                                "python tools/no_such_tool.py --out x\n"
                                "slidecaht eval mcq out.csv\n"
                                "slidechat eval mcq out.csv && slidechat eval mcq out.csv --bogus\n"
                                "slidechat train configs/tiny/stage_1.py --deepspeed configs/deepspeed/nope.json\n```\n")
    problems = check_markdown(text, path)
    joined = "\n".join(problems)
    assert "page.md:2:" in joined and "invalid choice: 'extract'" in joined
    assert "page.md:3:" in joined and "no_such_stage.py" in joined
    assert "page.md:4:" in joined and "no_such_tool.py" in joined
    assert "page.md:5:" in joined and "slidecaht" in joined
    assert "page.md:6:" in joined and "--bogus" in joined
    assert "page.md:7:" in joined and "nope.json" in joined
    assert len(problems) == 6, problems


def test_check_accepts_valid_commands_and_ignores_other_blocks(tmp_path: Path) -> None:
    text, path = _doc(tmp_path, "```bash\nNPROC_PER_NODE=8 slidechat train configs/tiny/stage_1.py --seed 0\n"
                                "slidechat eval mcq out.csv --out reports/   # a comment\n"
                                "slidechat eval mcq out.csv > report.md 2>&1 | head\n"
                                "slidechat --help\nsource .venv/bin/activate\n```\n\n"
                                "```\nslidechat not a command, just output\n```\n")
    assert check_markdown(text, path) == []


def test_check_catches_broken_links_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` section, here\n", encoding="utf-8")
    text, path = _doc(tmp_path, "[ok](other.md) [ok](other.md#a-code-section-here) [ok](#local)\n\n"
                                "# Local\n\n[bad](missing.md) [bad](other.md#nope)\n"
                                "```\n[not a link](inside-code.md)\n```\n")
    problems = check_markdown(text, path)
    assert len(problems) == 2, problems
    assert "page.md:5: link target 'missing.md'" in problems[0]
    assert "#nope" in problems[1]


def test_read_blocks_reads_the_run_marker(tmp_path: Path) -> None:
    blocks = read_blocks("<!-- doctest: run; creates: out/*.h5 out/qc; prints: 2 done -->\n```bash\n"
                         "slidechat --help\n```\n\n```bash\nslidechat --help\n```\n", "x.md")
    assert [b.run for b in blocks] == [True, False]
    assert blocks[0].creates == ["out/*.h5", "out/qc"] and blocks[0].prints == ["2 done"]
    assert blocks[0].line == 3
    with pytest.raises(ValueError, match="unknown doctest option"):
        read_blocks("<!-- doctest: run; makes: x -->\n```bash\nls\n```\n", "x.md")


# ---------------------------------------------------------------------------------------------
# The docs themselves.


def test_readme_is_a_front_page_and_docs_has_every_page() -> None:
    n_lines = len((REPO / "README.md").read_text(encoding="utf-8").splitlines())
    assert n_lines <= README_MAX_LINES, f"README.md has {n_lines} lines (front page: at most {README_MAX_LINES})"
    missing = [p for p in REQUIRED_PAGES if not (DOCS / f"{p}.md").is_file()]
    assert not missing, f"docs/ lacks {missing}"
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "index.md":
            assert f"({page.name}" in index, f"docs/index.md does not link {page.name}"
            assert f"(docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_documented_commands_and_links_are_valid(page: Path) -> None:
    problems = check_markdown(page.read_text(encoding="utf-8"), page)
    assert not problems, "\n".join(problems)


def _run_blocks() -> Dict[Path, List[Block]]:
    out: Dict[Path, List[Block]] = {}
    for page in doc_files():
        runs = [b for b in read_blocks(page.read_text(encoding="utf-8"), str(page)) if b.run]
        if runs:
            out[page] = runs
    return out


def test_every_cheap_capability_has_a_runnable_example() -> None:
    ran = [tuple(words) for blocks in _run_blocks().values() for b in blocks for _, words in commands(b)]
    missing = [" ".join(req) for req in REQUIRED_RUNS if not any(w[:len(req)] == req for w in ran)]
    assert not missing, f"no `<!-- doctest: run -->` example runs {missing}"


def _sandbox(tmp: Path) -> Path:
    """A folder laid out like the repo root for the examples: a copy of dataset/ (examples may write
    next to their inputs), links to tools/ and configs/ (read only)."""
    shutil.copytree(REPO / "dataset", tmp / "dataset")
    for name in ("tools", "configs"):
        (tmp / name).symlink_to(REPO / name, target_is_directory=True)
    return tmp


@pytest.mark.parametrize("page", sorted(_run_blocks()), ids=lambda p: p.relative_to(REPO).as_posix())
def test_runnable_examples_run(page: Path, tmp_path: Path) -> None:
    cwd = _sandbox(tmp_path)
    env = dict(os.environ, SLIDECHAT_DOC_PY=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    prelude = ('set -euo pipefail\nslidechat() { "$SLIDECHAT_DOC_PY" -m slidechat.cli.main "$@"; }\n'
               'python() { "$SLIDECHAT_DOC_PY" "$@"; }\n')
    for block in _run_blocks()[page]:
        where = f"{page.relative_to(REPO)}:{block.line}"
        proc = subprocess.run(["bash", "-c", prelude + "\n".join(block.lines)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
        tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-3000:]).strip()
        assert proc.returncode == 0, f"{where}: exit {proc.returncode}\n{tail}"
        for pattern in block.creates:
            found = [p for p in cwd.glob(pattern)] if any(c in pattern for c in "*?[") \
                else ([cwd / pattern] if (cwd / pattern).exists() else [])
            assert found, f"{where}: the page says it creates {pattern!r}; nothing there\n{tail}"
        for text in block.prints:
            assert text in proc.stdout + proc.stderr, f"{where}: the page says it prints {text!r}\n{tail}"

"""Every code block of the README and docs/ is checked (issue 23): Python blocks run as written in a
fresh interpreter from another folder, TOML blocks parse, and every ``tokenprune`` command line of a
shell block parses with the real command-line parsers (options renamed or removed fail here). A
block preceded by ``<!-- illustrative -->`` is a sketch with names the reader supplies: only its
syntax is checked."""
from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"(?P<mark><!-- illustrative -->\s*\n)?```(?P<lang>\w*)\n(?P<body>.*?)\n```", re.S)


@dataclass
class Block:
    doc: str
    line: int
    lang: str
    body: str
    illustrative: bool

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks() -> list[Block]:
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            out.append(Block(path.name, text[:m.start("body")].count("\n") + 1, m["lang"], m["body"], bool(m["mark"])))
    return out


ALL = blocks()
PYTHON = [b for b in ALL if b.lang == "python"]
SHELL = [b for b in ALL if b.lang in ("bash", "sh", "shell")]


def test_every_block_has_a_language():
    assert ALL and all(b.lang for b in ALL), [str(b) for b in ALL if not b.lang]


@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_python_blocks_run_as_written(block, tmp_path):
    ast.parse(block.body)                                  # illustrative ones too: at least valid Python
    if block.illustrative:
        return
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENPRUNE_CACHE=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-c", block.body], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, f"{block}:\n{res.stderr[-3000:]}"
    # a trailing "# value" comment on a print line is what the block says it prints
    expected = [c.strip() for line in block.body.splitlines() if line.lstrip().startswith("print(")
                for c in [line.split("#", 1)[1]] if "#" in line and re.fullmatch(r"\s*\w+\s*", c)]
    lines = res.stdout.splitlines()
    for value in expected:
        assert value in lines, f"{block}: expected a line {value!r}, got {lines}"


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "toml"], ids=str)
def test_toml_blocks_parse(block):
    tomllib.loads(block.body)


def command_lines(body: str) -> list[list[str]]:
    """The ``tokenprune ...`` invocations of a shell block (continuations joined, comments dropped,
    a leading ``bash .ci/setup &&`` / ``.venv/bin/`` removed)."""
    out = []
    for raw in body.replace("\\\n", " ").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        line = line.split("&&")[-1].strip()
        words = shlex.split(line)
        if words and Path(words[0]).name == "tokenprune":
            out.append(words[1:])
    return out


@pytest.mark.parametrize("block", [b for b in SHELL if command_lines(b.body)], ids=str)
def test_tokenprune_command_lines_parse(block):
    from tokenprune.cli import parse_command

    for argv in command_lines(block.body):
        try:
            parse_command(argv)
        except SystemExit as e:
            pytest.fail(f"{block}: `tokenprune {' '.join(argv)}` does not parse (exit {e.code})")

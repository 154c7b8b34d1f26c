"""Every ```python block in README.md and docs/*.md runs, and docs/api.md covers the public API.

Conventions for the documentation's code blocks:

- A ```python block is one test (its id is ``file:line`` of the opening fence) and runs in a
  fresh namespace, like a script, with the working directory set to a temporary folder (files a
  block writes, such as ``autoshard.dump`` directories, land there) and ``AUTOSHARD_CACHE_DIR``
  pointing into it (no plan cache is written under the user's home).
- A block preceded by the line ``<!-- continue -->`` (an HTML comment: GitHub does not show it)
  continues the block before it in the same file: it runs in that block's namespace and folder,
  as the next cell of a notebook would. Run alone (``pytest -k``), it runs its predecessors first.
- Blocks that are not Python (shell commands, output) are fenced ```sh or ```text and not run.

The 8 simulated CPU devices the blocks use come from tests/conftest.py (a reader on a CPU sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8``, as docs/quickstart.md says).
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import types
from dataclasses import dataclass

import pytest

import autoshard

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONTINUE = "<!-- continue -->"
FENCE = re.compile(r"^```(\S*)\s*$")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@dataclass(frozen=True)
class Block:
    page: pathlib.Path
    line: int            # 1-based line of the opening fence
    index: int           # position among the page's python blocks
    source: str
    continues: bool      # runs in the namespace of the page's previous python block

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def python_blocks(page: pathlib.Path) -> list[Block]:
    """The page's ```python blocks, in order; an unclosed fence is an error, not a silent skip."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{page.name}:{i + 1}: unclosed ``` fence")
        if opening.group(1) == "python":
            continues = i > 0 and lines[i - 1].strip() == CONTINUE
            if continues and not blocks:
                raise AssertionError(f"{page.name}:{i + 1}: {CONTINUE} before the first block")
            blocks.append(Block(page, i + 1, len(blocks), "\n".join(lines[i + 1:end]) + "\n",
                                continues))
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in python_blocks(page)]
_sessions: dict[pathlib.Path, tuple[int, dict, pathlib.Path]] = {}   # page -> last index run


def _run(block: Block, namespace: dict, folder: pathlib.Path) -> None:
    # padded so that tracebacks point at the page's own lines
    code = compile("\n" * block.line + block.source, str(block.page), "exec")
    cwd, environ = os.getcwd(), dict(os.environ)
    os.environ["AUTOSHARD_CACHE_DIR"] = str(folder / "autoshard-cache")
    os.chdir(folder)
    try:
        exec(code, namespace)
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)


def _chain(block: Block) -> list[Block]:
    """The blocks to run for ``block``: it, after the ones it continues."""
    page = [b for b in BLOCKS if b.page == block.page]
    start = block.index
    while page[start].continues:
        start -= 1
    return page[start:block.index + 1]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_code_block_runs(block, tmp_path):
    chain = _chain(block)
    last = _sessions.get(block.page)
    if len(chain) > 1 and last is not None and last[0] == block.index - 1:
        _, namespace, folder = last
        chain = chain[-1:]
    else:
        # a module of its own, so that classes a block defines (dataclasses, nnx.Module) find
        # their module in sys.modules as they would in a script
        module = types.ModuleType(f"docs_{block.page.stem}_{chain[0].index}".replace("-", "_"))
        sys.modules[module.__name__] = module
        namespace, folder = module.__dict__, tmp_path
    for b in chain:
        _run(b, namespace, folder)
    _sessions[block.page] = (block.index, namespace, folder)


def test_every_page_but_the_reference_has_code_that_runs():
    """The parser finds the blocks: a fence mistyped (```Python, ```py) would drop its test."""
    pages = {block.page for block in BLOCKS}
    assert [p.name for p in PAGES if p not in pages] == ["api.md", "testing.md"]


def test_relative_links_point_at_files_that_exist():
    missing = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing


def test_api_reference_has_a_heading_for_every_public_name():
    headings = "\n".join(line for line in (ROOT / "docs" / "api.md").read_text().splitlines()
                         if line.startswith("#"))
    absent = [name for name in autoshard.__all__
              if not re.search(rf"`{re.escape(name)}[(`]", headings)]
    assert not absent, f"docs/api.md has no heading for {absent}"

"""Write the architectures the backend allows into README.md and docs/architectures.md, between their
archs markers, as the backend lists them, and the README's table of mixes from ggufloop.plan.MIX_SPECS:
`make archs-doc`. Everything outside the markers is left as it is (docs/architectures.md's hand-written
sections too). tests/test_archs.py and tests/test_plan.py check that the blocks still match the backend
and the registry, so neither list is typed by hand."""

from __future__ import annotations

import re
from pathlib import Path

from ggufloop._lib import supported_archs
from ggufloop.plan import mix_table

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- archs:begin (make archs-doc) -->", "<!-- archs:end -->"
MIXES_BEGIN, MIXES_END = "<!-- mixes:begin (make archs-doc) -->", "<!-- mixes:end -->"


def readme_block(archs: tuple[str, ...]) -> str:
    """The README's block: one line of names."""
    return f"{BEGIN}\n{', '.join(f'`{a}`' for a in archs)}\n{END}"


def page_block(archs: tuple[str, ...]) -> str:
    """docs/architectures.md's block: a list."""
    return f"{BEGIN}\n" + "".join(f"- {a}\n" for a in archs) + END


def mixes_block() -> str:
    """The README's table of mixes."""
    return f"{MIXES_BEGIN}\n{mix_table()}\n{MIXES_END}"


def substitute(path: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the text between path's markers (the markers included) with block."""
    text = path.read_text()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no {begin} ... {end} block")
    path.write_text(pattern.sub(lambda _: block, text))


def main() -> None:
    archs = supported_archs()
    substitute(ROOT / "README.md", readme_block(archs))
    substitute(ROOT / "docs" / "architectures.md", page_block(archs))
    substitute(ROOT / "README.md", mixes_block(), MIXES_BEGIN, MIXES_END)


if __name__ == "__main__":
    main()

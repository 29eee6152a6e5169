"""Regenerate the README's method table from the registry (`make readme-methods`)."""

from __future__ import annotations

import re
from pathlib import Path

from mergeforge.cli import methods_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- methods:begin -->\n).*?(\n<!-- methods:end -->)", re.S)


def main() -> None:
    text = README.read_text(encoding="utf-8")
    if not BLOCK.search(text):
        raise SystemExit(f"{README}: no <!-- methods:begin --> ... <!-- methods:end --> block")
    new = BLOCK.sub(lambda m: m.group(1) + methods_markdown() + m.group(2), text)
    README.write_text(new, encoding="utf-8")
    print(f"updated the method table in {README}")


if __name__ == "__main__":
    main()

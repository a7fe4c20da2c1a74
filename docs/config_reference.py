"""Render the configuration reference in README.md from the annotated example config.

``config/edge-node.toml`` is the single source of every key, its default and its meaning (a test keeps
it complete against `config.settings`); this script turns it into the Markdown tables between the
``<!-- config-reference:start -->`` and ``<!-- config-reference:end -->`` markers of README.md, and
``tests/node/test_readme.py`` fails when the two drift apart. It reads files only; it imports nothing of
ours.

Run after changing the example config: ``.venv/bin/python docs/config_reference.py``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config" / "edge-node.toml"
README = REPO / "README.md"
START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
_SECTION = re.compile(r"^\[(\w+)\]\s*$")
_KEY = re.compile(r"^(\w+)\s*=\s*(.*)$")


def render_table(toml_text: str) -> str:
    """Markdown tables, one per section: key, default (as written in the file) and its comment.

    A key without its own comment shares the comment of the key above it (as the file's layout means).
    """
    out: list[str] = []
    section: str | None = None
    comment: list[str] = []
    previous = ""
    for raw in toml_text.splitlines():
        line = raw.rstrip()
        header = _SECTION.match(line)
        if header:
            section, comment, previous = header.group(1), [], ""
            out += ["", f"| `[{section}]` key | default | meaning |", "|---|---|---|"]
            continue
        if section is None:
            continue
        if line.startswith("#"):
            comment.append(line.lstrip("#").strip())
            continue
        key = _KEY.match(line)
        if key:
            default = re.split(r"\s+#", key.group(2), maxsplit=1)[0].strip()
            meaning = " ".join(comment) or previous
            meaning = meaning.replace("|", "\\|")
            out.append(f"| `{key.group(1)}` | `{default}` | {meaning} |")
            previous, comment = meaning, []
        elif not line:
            comment = []
    return "\n".join(out).strip() + "\n"


def rendered_readme(readme_text: str, toml_text: str) -> str:
    """README text with the block between the markers replaced by `render_table`."""
    start, end = readme_text.find(START), readme_text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md lacks the markers {START} ... {END}")
    return readme_text[: start + len(START)] + "\n" + render_table(toml_text) + readme_text[end:]


def main() -> int:
    text = README.read_text(encoding="utf-8")
    new = rendered_readme(text, CONFIG.read_text(encoding="utf-8"))
    if new != text:
        README.write_text(new, encoding="utf-8")
        print(f"updated the config reference in {README}")
    else:
        print("README.md config reference is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())

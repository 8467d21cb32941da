"""List the documentation pages and check that their relative links resolve.

Run by ``make docs``. Links to other sites are not fetched (this machine has no
network beyond package registries); a relative link to a file or folder of the
repository that does not exist is an error. Exit status 1 names each broken link.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", "node_modules", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
# [text](target) and [text]: target reference definitions; images too.
LINK = re.compile(r"\]\((?P<inline>[^)\s]+)(?:\s+\"[^\"]*\")?\)|^\[[^\]]+\]:\s*(?P<ref>\S+)", re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def pages() -> list[Path]:
    """Every Markdown file of the repository, outside tool and dependency folders."""
    found = []
    for path in sorted(ROOT.rglob("*.md")):
        if not SKIP_DIRS.intersection(path.relative_to(ROOT).parts):
            found.append(path)
    return found


def broken_links(page: Path) -> list[str]:
    """Relative link targets in ``page`` that do not exist."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    broken = []
    for match in LINK.finditer(text):
        target = match["inline"] or match["ref"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # another site, mailto:, or an anchor on the same page
        path = target.split("#", 1)[0].split("?", 1)[0]
        resolved = ROOT / path.lstrip("/") if path.startswith("/") else page.parent / path
        if not resolved.exists():
            broken.append(target)
    return broken


def main() -> int:
    """Print every page and its broken links; return 1 when any link is broken."""
    failures = 0
    all_pages = pages()
    for page in all_pages:
        name = page.relative_to(ROOT)
        broken = broken_links(page)
        print(f"  {name}" + (f"  BROKEN: {', '.join(broken)}" if broken else ""))
        failures += len(broken)
    print(f"docs: {len(all_pages)} pages, {failures} broken relative links")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

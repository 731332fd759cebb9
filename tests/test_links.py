"""Every relative link and image in the project's markdown (README.md, RESULTS.md, bench/, results/) points to a
file or folder that is in the repository, so the evidence behind every table resolves in a fresh clone."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "RESULTS.md"]
    for folder in ("bench", "results"):
        files += sorted((ROOT / folder).rglob("*.md"))
    return [f for f in files if f.is_file()]


def relative_links(text: str) -> list[str]:
    """The link targets of ``text`` outside fenced code, without URLs, mail links and same-page anchors."""
    targets = [m.group(1) for m in LINK.finditer(FENCE.sub("", text))]
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", t, re.I)]


def tracked(root: Path) -> set[str]:
    """Paths git tracks or would track (committed, staged or new and not ignored), relative to ``root``."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return set(out.splitlines())


def test_the_link_pattern_finds_links_and_skips_code_and_urls():
    text = "a [x](a/b.md) ![p](fig.png) [u](https://x.org) [s](#sec)\n```\n[c](in/code.md)\n```\n[t](c.csv#L2)"
    assert relative_links(text) == ["a/b.md", "fig.png", "c.csv#L2"]


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_committed_file(md: Path):
    files = tracked(ROOT)
    folders = {p for f in files for p in map(str, Path(f).parents)}
    missing = []
    for target in relative_links(md.read_text()):
        path = (md.parent / target.split("#")[0]).resolve()
        try:
            rel = str(path.relative_to(ROOT))
        except ValueError:
            missing.append(f"{target} (outside the repository)")
            continue
        if rel not in files and rel not in folders:
            missing.append(target)
    assert not missing, f"{md.relative_to(ROOT)} links to files that are not in the repository: {missing}"

"""The documentation site (issue 21, item 6): docs/ built by MkDocs (Material theme) in strict mode, so a broken
link or anchor, a page missing from the nav or a nav entry without its page fails; the README stays short and its
links resolve. The generated pages (docs/sizing.md, docs/gpu_projection.md) are compared with the code by
tests/test_sizing.py and tests/test_perf.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about its successor
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, env=env, timeout=300)


def _nav_pages(nav) -> list[str]:
    """Every page a mkdocs nav names, nested sections included."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in _nav_pages(v)]
    return [p for item in nav for p in _nav_pages(item)]


def _config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_the_site_builds_in_strict_mode_with_every_page_in_the_nav(tmp_path):
    config = _config()
    assert config["theme"]["name"] == "material" and config["strict"] is True
    pages = _nav_pages(config["nav"])
    assert sorted(pages) == sorted(p.name for p in DOCS.glob("*.md"))
    assert {"index.md", "install.md", "sizing.md", "gpu_projection.md"} <= set(pages)
    run = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert run.returncode == 0, run.stderr
    for page in pages:
        html = tmp_path / "site" / ("index.html" if page == "index.md" else f"{page[:-3]}/index.html")
        assert html.is_file(), page
    # the generated sizing page reaches the site whole: its last table row is in the HTML
    last_row = [line for line in (DOCS / "sizing.md").read_text().splitlines() if line.startswith("|")][-1]
    first_cell = last_row.strip("|").split("|")[0].strip()
    assert first_cell and first_cell in (tmp_path / "site" / "sizing" / "index.html").read_text()


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    return tmp_path


@pytest.mark.slow  # four more builds of the site: what the strict build above catches, shown on broken copies
@pytest.mark.parametrize("break_it, message", [
    (lambda d: (d / "usage.md").write_text((d / "usage.md").read_text() + "\nSee [the page](no_such_page.md).\n"),
     "no_such_page.md"),
    (lambda d: (d / "usage.md").write_text((d / "usage.md").read_text() + "\nSee [limits](reliability.md#nope).\n"),
     "#nope"),
    (lambda d: (d / "benchmarks.md").unlink(), "benchmarks.md"),
    (lambda d: (d / "orphan.md").write_text("# Not in the nav\n"), "orphan.md"),
], ids=["broken-link", "broken-anchor", "missing-page", "page-not-in-nav"])
def test_a_broken_link_or_a_missing_page_fails_the_build(tmp_path, break_it, message):
    site = _copy(tmp_path / "src")
    break_it(site / "docs")
    run = _build(site / "mkdocs.yml", tmp_path / "site")
    assert run.returncode != 0 and message in run.stderr, run.stderr


def test_the_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 80
    # the two commands, exactly as scripts/demo.sh and scripts/test.sh name themselves
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert {"docs/index.md", "docs/install.md"} <= set(local)
    assert [link for link in local if not (ROOT / link).exists()] == []
    # every page of the site is one link away from the README
    assert sorted(p for p in _nav_pages(_config()["nav"]) if f"docs/{p}" not in local) == []

"""Installing the project installs the engine, `memkfac`, and nothing else; the Dagster code location
(definitions.py, assets/, resources/, jobs/) loads from the project directory, as workspace.yaml says."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import memkfac

PROJECT = Path(__file__).resolve().parents[1]
CODE_LOCATION = ("definitions", "assets", "resources", "jobs")
NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".memkfac",
    ".dagster_home",
    "*.egg-info",
    "build",
    "__pycache__",
    ".*_cache",
    "target",
    "logs",
)


@pytest.mark.slow  # builds and installs the project: ~10 s
def test_a_non_editable_install_puts_only_memkfac_into_site_packages(tmp_path):
    source = shutil.copytree(PROJECT, tmp_path / "project", ignore=NOT_SOURCES)
    site = tmp_path / "site-packages"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            site,
            source,
        ],
        check=True,
    )
    installed = {p.name for p in site.iterdir()}
    assert installed == {"memkfac", f"memkfac-{memkfac.__version__}.dist-info", "bin"}
    assert [p.name for p in (site / "bin").iterdir()] == ["memkfac"]
    assert (site / "memkfac" / "cli" / "__init__.py").is_file()
    assert (site / f"memkfac-{memkfac.__version__}.dist-info" / "top_level.txt").read_text().split() == [
        "memkfac"
    ]
    engine = sorted(p.relative_to(PROJECT / "memkfac") for p in (PROJECT / "memkfac").rglob("*.py"))
    assert sorted(p.relative_to(site / "memkfac") for p in (site / "memkfac").rglob("*.py")) == engine


def test_the_code_location_is_importable_only_from_the_project_directory(tmp_path):
    probe = "import importlib.util as u; print([n for n in {names} if u.find_spec(n)])"
    elsewhere = subprocess.run(
        [sys.executable, "-c", "import memkfac.cli; " + probe.format(names=CODE_LOCATION)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert elsewhere.stdout.strip() == "[]"  # the engine is installed, the code location is not
    here = subprocess.run(
        [sys.executable, "-c", probe.format(names=CODE_LOCATION)], cwd=PROJECT, capture_output=True, text=True
    )
    assert here.stdout.strip() == str(list(CODE_LOCATION))


def test_the_pipes_factor_script_needs_only_dagster_pipes_and_memkfac():
    """It runs by path (``python resources/pipes_collect_factors.py``) where only the engine (and so
    torch, which it needs anyway) and dagster-pipes are installed."""
    tree = ast.parse((PROJECT / "resources" / "pipes_collect_factors.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported - set(sys.stdlib_module_names) == {"dagster_pipes", "memkfac", "torch"}


DOCUMENTS = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def _anchors(markdown: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces as '-'."""
    anchors, fenced = set(), False
    for line in markdown.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6} (.+)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("document", DOCUMENTS, ids=[d.name for d in DOCUMENTS])
def test_every_relative_link_in_the_docs_resolves(document):
    broken = []
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not checked offline
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists() or not linked.resolve().is_relative_to(PROJECT):
            broken.append(f"{target}: no such file in the project")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{document.name}: " + "; ".join(broken)


def test_nothing_refers_to_files_outside_the_repository():
    """Notes and paths of the machine the project was developed on are not part of the project."""
    if shutil.which("git") is None or not (PROJECT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=PROJECT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    outside = re.compile(r"DESIGN\.md|/work/|\.\./shared|paper_spec|kfac_engine_notes|dagster_notes")
    found = []
    for name in filter(None, tracked):
        path = PROJECT / name
        if path == Path(__file__).resolve() or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:  # images
            continue
        found += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1) if outside.search(line)]
    assert not found, found

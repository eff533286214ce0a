"""The README is a front page and ``docs/`` holds the rest: every relative link in them
resolves inside the repository, none leaves it, and the front page stays short."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                               if f.endswith(".md"))
# [text](target), not inside inline code; targets with a scheme are external
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a citation of the outside contract: "SPEC 3.4", "SPEC §7", "SPEC section 2", "the SPEC's
# tie rule", "SPEC: ...", "../shared/SPEC.md" -- not the ops' descriptor variables (SPEC = ...)
CITATION = re.compile(r"SPEC(?:'s)?\s+(?:§|\d|section\b|order\b|leaves\b)|\bSPEC:|\bthe SPEC\b|SPEC\.md|\.\./shared")
TOPICS = ("backends", "gpu", "data", "training", "distributed", "inference", "robustness", "results",
          "contract")


def _links(page: str) -> list[str]:
    with open(os.path.join(ROOT, page)) as fh:
        text = re.sub(r"`[^`\n]*`", "", fh.read())  # a link written as code is not a link
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves_inside_the_repository(page):
    base = os.path.dirname(os.path.join(ROOT, page))
    for target in _links(page):
        path = target.split("#", 1)[0]
        if not path:
            continue
        full = os.path.normpath(os.path.join(base, path))
        assert os.path.commonpath([full, ROOT]) == ROOT, f"{page}: {target} leaves the repository"
        assert os.path.exists(full), f"{page}: {target} does not exist"


def test_link_checker_sees_a_broken_link_and_a_citation():
    assert LINK.findall("see [x](docs/nope.md) and `[y](z)`") == ["docs/nope.md", "z"]
    for cited in ("SPEC 3.4", "SPEC\n    3.4", "SPEC §7", "SPEC section 2", "the SPEC's tie", "(SPEC: such",
                  "../shared/SPEC.md"):
        assert CITATION.search(cited), cited
    for code in ("SPEC = OpSpec(", "dispatch(SPEC, (x,", "SPECS.items()", "PROBE_SPEC)"):
        assert not CITATION.search(code), code


def test_readme_is_a_front_page_with_a_page_per_topic():
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    assert readme.count("\n") <= 220
    for topic in TOPICS:
        assert os.path.exists(os.path.join(ROOT, "docs", f"{topic}.md")), topic
        assert f"docs/{topic}.md" in readme, topic


def test_no_docstring_or_page_cites_the_outside_spec():
    """Citations point at docs/contract.md ("contract §n.m"), which a clone has."""
    bad = []
    for top in ("msa_fast", "tests", "benchmarks", "tools", "experiments", "csrc", "docs"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if not f.endswith((".py", ".md", ".cpp", ".cu", ".h", ".sh")) or f == "test_docs.py":
                    continue
                with open(os.path.join(dirpath, f), errors="replace") as fh:
                    text = fh.read()
                if CITATION.search(text):
                    bad.append(os.path.relpath(os.path.join(dirpath, f), ROOT))
    with open(os.path.join(ROOT, "README.md")) as fh:
        if CITATION.search(fh.read()):
            bad.append("README.md")
    assert not bad, bad

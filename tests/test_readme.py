"""The README's pictures and the files it names as links are in the repository."""
from __future__ import annotations

import re

from conftest import ROOT


def test_every_image_and_relative_link_in_the_readme_exists():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s#]+)\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+:", t)]  # not URLs (nor the javascript: of an attack example)
    assert any(t.endswith(".png") for t in local)  # the pattern does find the screenshots
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README names files that are not there: {missing}"

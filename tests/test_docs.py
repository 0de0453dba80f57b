"""What the user docs may say: nothing that points outside the repository, and one
benchmark run wherever stage-two numbers appear (the README's table is `run_all.py`'s
own output; docs/train.md quotes `bench_train.py`'s part of the same run)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
USER_DOCS = sorted([REPO / "README.md", *REPO.glob("docs/**/*.md")])


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_doc_cites_only_the_repository(doc):
    # The project's spec and environment notes, and how it was developed, are not
    # something a user has.
    text = doc.read_text()
    found = re.findall(r"SPEC\b|ENV\.md|\bsessions?\b|\blent\b", text)
    assert not found, f"{doc.name} mentions {found}"


def _code_block_starting(text: str, first: str) -> list[str]:
    blocks = [b.splitlines() for lang, b in re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M) if not lang]
    matching = [b for b in blocks if b and b[0].startswith(first)]
    assert len(matching) == 1, f"expected one quoted block starting {first!r}"
    return matching[0]


def test_stage_two_numbers_are_one_run():
    table = _code_block_starting((REPO / "README.md").read_text(), "minorsft benchmarks,")
    readme = {}
    for line in table:
        match = re.match(r"(stage (?:one|two) [^\d]+?)\s{2,}(\S+)\s+([\d,.]+)\s+([\d.]+)$", line)
        if match:
            readme[(match[1].strip(), match[2])] = float(match[3].replace(",", ""))
    bench = _code_block_starting((REPO / "docs" / "train.md").read_text(), "loss ")
    variants = 0
    for line in bench[1:]:
        fields = line.split()
        if len(fields) != 7:
            continue
        name, step_s, _, tokens_per_s, _, peak_mib, _ = fields
        variants += 1
        assert readme[("stage two s/step", name)] == pytest.approx(float(step_s), abs=0.0051)
        assert readme[("stage two tokens/s", name)] == pytest.approx(float(tokens_per_s), abs=0.51)
        assert readme[("stage two peak MiB", name)] == pytest.approx(float(peak_mib), abs=0.51)
    assert variants == 4

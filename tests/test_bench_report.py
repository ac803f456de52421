"""benchmarks/report.py: the committed docs/BENCHMARKS.md is what the committed docs/*.json say.

Each test works on a copy of the document in a temp dir (plots go there too); the committed
JSON files are read, never written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks.report import SECTIONS, MissingBlockError, main, report

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCKS = [b for s in SECTIONS for b in s.blocks]


def block(doc: str, name: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    return doc[doc.index(begin) : doc.index(end) + len(end)]


@pytest.fixture
def doc(tmp_path: Path) -> Path:
    path = tmp_path / "BENCHMARKS.md"
    shutil.copyfile(DOCS / "BENCHMARKS.md", path)
    return path


def test_committed_document_is_what_the_json_says(doc: Path, tmp_path: Path) -> None:
    before = doc.read_bytes()
    notes = report(DOCS, doc, tmp_path / "img")
    assert doc.read_bytes() == before  # idempotent: nothing hand-edited inside the blocks
    assert len(notes) == len(SECTIONS)
    for s in SECTIONS:
        assert (tmp_path / "img" / f"{s.name}.png").stat().st_size > 0
        assert f"![{s.name}](img/{s.name}.png)" in before.decode()


def test_missing_json_leaves_its_blocks_untouched(doc: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for s in SECTIONS:
        if s.name != "serve":
            shutil.copyfile(DOCS / f"{s.name}.json", docs / f"{s.name}.json")
    text = doc.read_text()
    stale = {b: f"<!-- {b}:begin -->\nstale {b}\n<!-- {b}:end -->" for b in BLOCKS}
    for b in BLOCKS:
        text = text.replace(block(text, b), stale[b])
    doc.write_text(text)

    notes = report(docs, doc, tmp_path / "img")

    out, committed = doc.read_text(), (DOCS / "BENCHMARKS.md").read_text()
    for b in ("serve", "serve-bytes"):
        assert block(out, b) == stale[b]
    for b in ("ann", "step", "echo"):
        assert block(out, b) == block(committed, b)
    assert not (tmp_path / "img" / "serve.png").exists()
    assert any("serve.json missing" in n for n in notes)


def test_missing_block_marker_raises_and_writes_nothing(doc: Path, tmp_path: Path) -> None:
    text = doc.read_text().replace("<!-- echo:end -->\n", "")
    doc.write_text(text)
    with pytest.raises(MissingBlockError, match="'echo'"):
        report(DOCS, doc, tmp_path / "img")
    assert doc.read_text() == text  # checked before any block is written
    assert not (tmp_path / "img").exists()  # and before any plot


def test_cli_reports_a_missing_block_with_exit_status_2(doc: Path, tmp_path: Path, capsys) -> None:
    doc.write_text(doc.read_text().replace("<!-- step:begin -->", ""))
    args = ["--docs", str(DOCS), "--markdown", str(doc), "--img", str(tmp_path / "img")]
    assert main(args) == 2
    assert "no generated block 'step'" in capsys.readouterr().err

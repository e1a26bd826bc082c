"""Readers and chunking: every format gives documents with sections and exact offsets, and every
unreadable item is rejected with a reason (read = accepted + rejected).
"""

from __future__ import annotations

import json

import pytest

from kiban.index import ChunkingConfig, Document, Rejected, Section, TableColumns, chunk_document, read_path


def _read(path, **options):
    items = list(read_path(path, **options))
    return [i for i in items if isinstance(i, Document)], [i for i in items if isinstance(i, Rejected)]


def test_markdown_sections_and_title(tmp_path):
    path = tmp_path / "protocol.md"
    path.write_text("# Western blot\n\nIntro text.\n\n## Transfer\n\nRun at 100 V.\n\n## Blocking\n\n5% milk.\n")
    (doc,), rejects = _read(path)
    assert rejects == [] and doc.title == "Western blot"
    assert [s.title for s in doc.sections] == ["Western blot", "Transfer", "Blocking"]
    assert doc.text[doc.sections[1].start : doc.sections[1].end].strip() == "## Transfer\n\nRun at 100 V."


JATS = """<?xml version="1.0"?>
<article xmlns:xlink="http://www.w3.org/1999/xlink"><front><article-meta>
<title-group><article-title>p53 and <italic>apoptosis</italic></article-title></title-group>
<abstract><sec><title>Background</title><p>p53 is a tumour suppressor.</p></sec>
<sec><title>Results</title><p>It induces apoptosis.</p></sec></abstract></article-meta></front>
<body><sec><title>Methods</title><p>We used mice.</p><sec><title>Statistics</title><p>t-tests.</p></sec></sec></body>
</article>"""

PUBMED = """<PubmedArticleSet><PubmedArticle><MedlineCitation><PMID>123</PMID><Article>
<ArticleTitle>Insulin in mice</ArticleTitle><Abstract><AbstractText Label="BACKGROUND">Insulin.</AbstractText>
<AbstractText Label="RESULTS">Glucose fell.</AbstractText></Abstract></Article></MedlineCitation></PubmedArticle>
<PubmedArticle><MedlineCitation><PMID>124</PMID><Article><ArticleTitle>Empty</ArticleTitle></Article>
</MedlineCitation></PubmedArticle></PubmedArticleSet>"""


def test_jats_article(tmp_path):
    path = tmp_path / "paper.nxml"
    path.write_text(JATS)
    (doc,), _ = _read(path)
    assert doc.title == "p53 and apoptosis"
    assert [s.title for s in doc.sections] == [
        "Abstract / Background", "Abstract / Results", "Methods", "Methods / Statistics"
    ]
    assert doc.text[doc.sections[1].start : doc.sections[1].end] == "It induces apoptosis."


def test_pubmed_xml_one_document_per_article_and_empty_ones_rejected(tmp_path):
    path = tmp_path / "pubmed.xml"
    path.write_text(PUBMED)
    (doc,), (reject,) = _read(path)
    assert doc.title == "Insulin in mice" and doc.source.endswith("#pmid=123")
    assert [s.title for s in doc.sections] == ["Background", "Results"]
    assert reject.source.endswith("#pmid=124") and reject.reason == "no text"


def _pdf(text: str) -> bytes:
    """A one-page PDF showing ``text`` in Helvetica (built by hand: offsets computed, no library)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_pdf_text_by_page_and_broken_pdf_rejected(tmp_path):
    (tmp_path / "paper.pdf").write_bytes(_pdf("Ribosomes translate mRNA into protein."))
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    docs, rejects = _read(tmp_path)
    assert [d.title for d in docs] == ["Ribosomes translate mRNA into protein."]
    assert docs[0].sections[0].title == "page 1" and "Ribosomes translate" in docs[0].text
    assert [r.source for r in rejects] == [str(tmp_path / "broken.pdf")] and "PDF" in rejects[0].reason


def test_tables_of_abstracts_count_every_row(tmp_path):
    csv_path = tmp_path / "abstracts.csv"
    csv_path.write_text('pmid,title,abstract\n1,"First","Text one, with a comma."\n2,"Second",""\n3,,Text three.\n')
    jsonl_path = tmp_path / "abstracts.jsonl"
    jsonl_path.write_text(json.dumps({"id": "a", "text": "Alpha."}) + "\n{broken\n[1, 2]\n" + json.dumps({"id": "b"}) + "\n")
    docs, rejects = _read(csv_path)
    assert [(d.title, d.source.split("#")[1]) for d in docs] == [("First", "pmid=1"), ("pmid 3", "pmid=3")]
    assert [(r.source.split("#")[1], r.reason) for r in rejects] == [("row=2", "no text in column 'abstract'")]
    docs, rejects = _read(jsonl_path)
    assert [d.text for d in docs] == ["Alpha."]
    assert [r.source.split("#")[1] for r in rejects] == ["row=2", "row=3", "row=4"]
    assert "not JSON" in rejects[0].reason and "not an object" in rejects[1].reason


def test_table_without_a_text_column_is_rejected_whole_and_columns_can_be_named(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("key\tsummary\nk1\tSome summary.\n")
    docs, (reject,) = _read(path)
    assert docs == [] and "no text column" in reject.reason and "summary" in reject.reason
    (doc,), _ = _read(path, columns=TableColumns(id="key", text="summary"))
    assert doc.text == "Some summary." and doc.source.endswith("#key=k1")
    (reject,) = list(read_path(path, columns=TableColumns(text="nope")))
    assert "no text column 'nope'" in reject.reason


def test_unknown_missing_and_undecodable_files_are_rejected(tmp_path):
    (tmp_path / "notes.docx").write_bytes(b"PK\x03\x04")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / ".hidden.txt").write_text("skipped")
    docs, rejects = _read(tmp_path)
    reasons = {r.source.rsplit("/", 1)[-1]: r.reason for r in rejects}
    assert docs == [] and set(reasons) == {"notes.docx", "latin1.txt"}
    assert "unknown format '.docx'" in reasons["notes.docx"] and "utf-8" in reasons["latin1.txt"]
    (missing,) = list(read_path(tmp_path / "nope.md"))
    assert missing.reason == "no such file or folder"


def test_chunks_cover_each_section_with_exact_offsets():
    sentence = "Cells divide by mitosis after DNA replication. "
    body = sentence * 60
    text = "Intro\n" + body + "\nTail section text."
    sections = (Section("Intro", 0, 6 + len(body)), Section("Tail", 6 + len(body) + 1, len(text)))
    doc = Document(title="t", source="s", text=text, sections=sections)
    config = ChunkingConfig(max_chars=300, overlap_chars=60)
    chunks = chunk_document(doc, config)
    assert all(c.text == text[c.start : c.end] and len(c.text) <= 300 for c in chunks)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    intro = [c for c in chunks if c.section == "Intro"]
    assert all(c.end <= sections[0].end for c in intro) and chunks[-1].section == "Tail"
    covered = set()
    for c in intro:
        covered.update(range(c.start, c.end))
    assert all(i in covered for i in range(sections[0].end) if not text[i].isspace())  # nothing lost
    assert all(a.end > b.start for a, b in zip(intro, intro[1:]))  # consecutive chunks overlap
    assert intro[0].text.endswith(".")  # cut at a sentence end


def test_group_names_are_checked():
    from kiban.index import check_groups

    assert check_groups(["b", "a", "b"]) == ("a", "b")
    with pytest.raises(ValueError, match="'lab a' is not a valid group name"):
        check_groups(["lab a"])

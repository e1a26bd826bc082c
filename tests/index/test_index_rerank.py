"""The optional cross-encoder re-ranker: a local sequence-classification folder re-scores the fused
candidates, the order follows its scores, and it only ever sees the caller's passages.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from kiban.encoders.text import minilm_path
from kiban.index import CrossEncoderReranker, Document, Indexer, Section, open_store


def _tiny_cross_encoder(path) -> str:
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_reranker_orders_by_its_scores_within_the_callers_groups(tmp_path, embedder):
    reranker = CrossEncoderReranker(_tiny_cross_encoder(tmp_path / "cross-encoder"))
    indexer = Indexer(open_store(str(tmp_path / "index")), embedder=embedder)
    texts = [f"Insulin signalling note {n}: glucose uptake in muscle cell line {n}." for n in range(6)]
    docs = [Document(title=f"n{n}", source="t", text=t, sections=(Section("", 0, len(t)),)) for n, t in enumerate(texts)]
    indexer.add(docs[:4], groups=["lab-a"])
    indexer.add(docs[4:], groups=["lab-b"])
    hits = indexer.retriever(reranker=reranker).search("insulin glucose uptake", groups=["lab-a"], k=3)
    assert len(hits) == 3 and {h.chunk.doc_id for h in hits} <= {d.doc_id for d in docs[:4]}
    assert [h.ranks["rerank"] for h in hits] == [1, 2, 3]
    expected = reranker.scores("insulin glucose uptake", [h.chunk.text for h in hits])
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert scores == pytest.approx(expected, abs=1e-5)  # padding differs between the two batches

"""The DNA masked-token objective: its head, its masking over the encoder's own tokens, learning on real promoters."""

import itertools
from pathlib import Path

import pytest
import torch

from kiban.data import Rejects, read
from kiban.data.resumable import seeded
from kiban.encoders.base import create_encoder
from kiban.encoders.pretraining import IGNORE_INDEX, create_objective, load_encoder, save_encoder
from kiban.train.pretrain_data import evaluate_objective, masked_batches

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def _real_records(relative, *, modality, n):
    """The first ``n`` records of a shared data file, or a clean skip where the data is absent."""
    path = SHARED / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared real data)")
    return list(itertools.islice(read(path, rejects=Rejects(), modality=modality), n))


def _lowers_loss(objective, records, *, steps, lr, crop=None, batch_size=16):
    """(held-out loss before, after) ``steps`` seeded AdamW steps on the other records.

    One thread: tiny matrices gain nothing from two, and a shared, loaded machine makes the
    second thread's synchronisation cost more than the work.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(objective, records, steps=steps, lr=lr, crop=crop, batch_size=batch_size)
    finally:
        torch.set_num_threads(threads)


def _train(objective, records, *, steps, lr, crop, batch_size):
    torch.manual_seed(0)
    held_out, train = records[:32], records[32:]
    evaluation = masked_batches(objective, held_out, batch_size=32, seed=10**6, crop=crop)
    before = evaluate_objective(objective, evaluation)["loss"]
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=lr)
    objective.train()
    for step in range(steps):
        start = (step * batch_size) % len(train)
        (batch,) = masked_batches(
            objective, train[start : start + batch_size], batch_size=batch_size, seed=step, crop=crop
        )
        optimizer.zero_grad()
        objective(batch).loss.backward()
        optimizer.step()
    return before, evaluate_objective(objective, evaluation)["loss"]


def test_an_encoder_without_a_head_gets_one_and_saves_it(tmp_path):
    encoder = create_encoder("dna", preset="tiny")
    assert encoder.lm_head is None
    objective = create_objective("dna", encoder)
    assert encoder.lm_head is not None and encoder.config.mlm_head
    assert all(p.requires_grad for p in encoder.lm_head.parameters())
    save_encoder(encoder, tmp_path / "enc")
    again = create_encoder("dna", preset="tiny", weights_path=str(tmp_path / "enc"))
    assert again.lm_head is not None
    tokens = objective.masker.collate([objective.masker(encoder.featurizer("ACGTACGTAC"))])["tokens"]
    with torch.no_grad():
        assert torch.equal(encoder.eval().masked_lm_logits(tokens), again.eval().masked_lm_logits(tokens))
    assert load_encoder(tmp_path / "enc").config.mlm_head


def test_kmer_masking_selects_sequence_tokens_and_draws_random_kmers():
    encoder = create_encoder("dna", preset="tiny", tokenization="kmer", k=3)
    masker = create_objective("dna", encoder).masker
    f = encoder.featurizer
    tokens = f("ACGTTGCA" * 40 + "NNN")["tokens"]
    specials = {f.cls_id, f.sep_id, f.pad_id, f.mask_id, f.unk_id}
    for seed in range(20):
        with seeded(seed):
            out = masker({"tokens": tokens})
        selected = out["targets"].ne(IGNORE_INDEX)
        assert not selected[0] and not selected[-1]
        changed = selected & out["tokens"].ne(tokens) & out["tokens"].ne(f.mask_id)
        replaced = out["tokens"][changed].tolist()
        assert not set(replaced) & specials
        assert all(set(token) <= set("ACGT") for token in f.token_strings(replaced))


def test_a_few_seeded_steps_lower_the_loss_on_real_promoters():
    records = _real_records("dna/ecoli_promoters_iPromoter2L_benchmark.csv", modality="dna", n=96)
    encoder = create_encoder("dna", preset="tiny", width=32, ff_dim=64, num_heads=4)
    before, after = _lowers_loss(create_objective("dna", encoder), records, steps=40, lr=3e-3)
    assert after < before - 0.1, (before, after)

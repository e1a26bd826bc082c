"""ESM-2's masked-residue objective: the 15% / 80-10-10 statistics, its LM head, and learning on real sequences."""

import itertools
import math
from pathlib import Path

import pytest
import torch

from kiban.data import Rejects, read
from kiban.data.resumable import seeded
from kiban.encoders.base import create_encoder
from kiban.encoders.pretraining import IGNORE_INDEX, create_objective
from kiban.encoders.protein_objectives import STANDARD_RESIDUES
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


def test_masking_statistics_are_esm2s():
    encoder = create_encoder("protein", preset="tiny", max_length=5000)
    masker = create_objective("protein", encoder).masker
    alphabet = encoder.model.alphabet
    rng = torch.Generator().manual_seed(0)
    letters = [STANDARD_RESIDUES[i] for i in torch.randint(20, (4000,), generator=rng)]
    counts = dict.fromkeys(("positions", "selected", "masked", "random", "kept", "specials_touched"), 0)
    for seed in range(50):
        tokens = encoder.featurizer("".join(letters))["tokens"]
        with seeded(seed):
            out = masker({"tokens": tokens})
        selected = out["targets"].ne(IGNORE_INDEX)
        assert torch.equal(out["targets"][selected], tokens[selected])  # the target is the original residue
        counts["specials_touched"] += int(selected[0]) + int(selected[-1])
        counts["positions"] += len(tokens) - 2
        counts["selected"] += int(selected.sum())
        masked = out["tokens"].eq(alphabet.mask_idx)
        assert not (masked & ~selected).any()  # nothing outside the selection is corrupted
        assert torch.equal(out["tokens"][~selected], tokens[~selected])
        counts["masked"] += int(masked.sum())
        changed = selected & ~masked & out["tokens"].ne(tokens)
        counts["random"] += int(changed.sum())
        counts["kept"] += int((selected & ~masked & ~changed).sum())
        assert set(out["tokens"][changed].tolist()) <= {
            encoder.featurizer.token_ids[a] for a in STANDARD_RESIDUES
        }
    assert counts["specials_touched"] == 0
    n = counts["selected"]
    assert counts["selected"] / counts["positions"] == pytest.approx(0.15, abs=0.003)
    assert counts["masked"] / n == pytest.approx(0.80, abs=0.01)
    # a random residue equals the original 1 time in 20: 10% x 19/20 change, 10% + 10% x 1/20 stay
    assert counts["random"] / n == pytest.approx(0.095, abs=0.006)
    assert counts["kept"] / n == pytest.approx(0.105, abs=0.006)


def test_every_short_sequence_carries_loss():
    objective = create_objective("protein", create_encoder("protein", preset="tiny"))
    for seed in range(30):
        with seeded(seed):
            out = objective.masker(objective.encoder.featurizer("MK"))
        assert out["targets"].ne(IGNORE_INDEX).sum() >= 1


def test_the_objective_trains_esm2s_own_lm_head_and_leaves_the_contact_regression_frozen():
    encoder = create_encoder("protein", preset="tiny")
    assert not encoder.model.lm_head.dense.weight.requires_grad  # frozen for fusion
    create_objective("protein", encoder)
    assert encoder.model.lm_head.dense.weight.requires_grad
    assert encoder.model.lm_head.weight is encoder.model.embed_tokens.weight  # ESM-2's tied output matrix
    assert not any(p.requires_grad for p in encoder.model.contact_head.parameters())


def test_a_few_seeded_steps_lower_the_loss_on_real_protein_sequences():
    records = _real_records("protein/sequences/enzyme_ec_clean_split10_train.tsv", modality="protein", n=96)
    encoder = create_encoder("protein", preset="tiny", num_layers=2, embed_dim=32, attention_heads=4)
    objective = create_objective("protein", encoder)
    objective.init_for_training()
    before, after = _lowers_loss(objective, records, steps=40, crop=96, lr=3e-3)
    assert after < before - 0.1, (before, after)


def test_creating_the_objective_keeps_the_encoders_weights_and_init_for_training_starts_near_ln33():
    encoder = create_encoder("protein", preset="tiny")
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    objective = create_objective("protein", encoder)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # a loaded encoder stays
    objective.init_for_training()
    assert float(encoder.model.embed_tokens.weight.std()) == pytest.approx(0.02, rel=0.2)
    batch = objective.masker.collate([objective.masker(encoder.featurizer("MKTAYIAKQRQISFVKSHFSRQ" * 4))])
    assert float(objective(batch).loss) == pytest.approx(math.log(33), abs=0.3)

"""Molecule design: every sample is a molecule RDKit parses, conditions are checked and never
looped on, the same seed gives the same designs, and duplicates and training-set copies are counted.

The model is a tiny random one (its LLM weights scaled x20 so that samples vary with the seed);
what it designs is chemistry-free, which is the point: validity must come from the decoding.
"""

from __future__ import annotations

import random

import pytest
import torch
from rdkit import Chem

from kiban.design import (
    ConditionError,
    Reference,
    SelfiesConstraint,
    design_molecules,
    design_prompt,
    parse_conditions,
)
from kiban.design.selfies_decoding import default_alphabet, split_symbols
from kiban.encoders.base import InvalidInput
from kiban.fusion.generation import PromptTooLong
from kiban.tiny import tiny_model

REFERENCE = ["CCO", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O", "CN1CCC[C@H]1c1cccnc1", "O=C(O)CCc1ccccc1"]


@pytest.fixture(scope="module")
def model():
    model = tiny_model(["protein", "molecule"], seed=0).eval()
    with torch.no_grad():
        for param in model.llm.parameters():
            if param.dim() == 2:
                param.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def reference():
    return Reference.from_smiles(REFERENCE)


def _assert_valid(report):
    alphabet = set(default_alphabet())
    assert report.sampled == report.valid + report.invalid and report.invalid == 0
    for design in report.designs:
        assert design.smiles is not None and Chem.MolFromSmiles(design.smiles) is not None, design
        symbols = split_symbols(design.selfies)
        assert symbols and "".join(symbols) == design.selfies and set(symbols) <= alphabet


def test_every_sample_parses_in_rdkit_unconditioned_and_under_hard_conditions(model):
    free = design_molecules(model, n=12, seed=1, batch_size=12, budget=12)
    assert free.sampled == 12 and len({d.smiles for d in free.designs}) > 3  # the seed matters
    _assert_valid(free)
    hard = design_molecules(
        model, n=4, conditions=parse_conditions("MW > 900, QED > 0.95, HBD = 7"), seed=2, budget=16, batch_size=8
    )
    _assert_valid(hard)
    assert hard.sampled == 16 and len(hard.met) == 0  # a random model meets none: the budget ends it


def test_any_string_of_the_alphabet_a_training_set_adds_parses_in_rdkit():
    # A training set brings symbols beyond SELFIES' robust alphabet (chirality, charges, rare
    # elements). The decoder bounds an element it has no bonding capacity for at 8 bonds, so "[In]"
    # or "[Si]" in the alphabet let a model write molecules RDKit refuses (one in 300 samples of a
    # trained model did). Only the symbols that keep the alphabet robust may be added.
    from kiban.design.selfies_decoding import _NOT_FIRST, decode_selfies, encode_selfies

    training = ["C[In](C)C", "C[Se]C", "C[Si](C)(C)C", "C[As](C)C", "C[C@@H](N)C(=O)O", "C[N+](C)(C)C", "CS(=O)(=O)[N-]C", "OB(O)c1ccccc1"]
    extra = {symbol for smiles in training for symbol in split_symbols(encode_selfies(smiles))}
    alphabet = default_alphabet(extra)
    assert {"[C@@H1]", "[N+1]", "[N-1]", "[B]"} <= set(alphabet) and not {"[In]", "[Se]", "[Si]", "[As]"} & set(alphabet)
    atoms = [s for s in alphabet if not s.startswith(_NOT_FIRST)]
    rng = random.Random(0)
    for _ in range(3000):
        selfies = rng.choice(atoms) + "".join(rng.choices(alphabet, k=rng.randint(0, 30)))
        smiles = decode_selfies(selfies)
        assert smiles and Chem.MolFromSmiles(smiles) is not None, selfies


def test_rows_cut_by_their_token_budget_still_decode(model):
    report = design_molecules(model, n=8, seed=3, max_tokens=5, budget=8, batch_size=8, temperature=2.0)
    assert any(d.finish_reason == "length" for d in report.designs)
    _assert_valid(report)


def test_max_symbols_bounds_length_in_symbols_not_tokens(model):
    # a byte-level backbone spends one token per character: a token budget of 80 would cut most
    # training molecules (median 38 symbols, about 180 characters); the bound is in symbols
    # (a backbone that never wants to stop: end-of-sequence far down, so only the bound ends a row)
    eos = model.tokenizer.eos_token_id
    constraint = SelfiesConstraint(model.tokenizer, max_symbols=7)
    rng = random.Random(1)
    for _ in range(10):
        ids: list[int] = []
        while len(ids) < constraint.max_tokens():
            logits = torch.tensor([rng.gauss(0, 3) for _ in range(len(model.tokenizer))])
            logits[eos] = -1e4
            token = int(constraint(ids, logits).argmax())
            if token == eos:
                break
            ids.append(token)
        assert token == eos, "the row ran to its token budget instead of ending at max_symbols"
        assert len(split_symbols(model.tokenizer.decode(ids))) == 7
    short = design_molecules(model, n=8, seed=3, max_symbols=2, budget=8, batch_size=8, temperature=2.0)
    assert all(d.selfies.count("]") <= 2 for d in short.designs)
    assert all(d.finish_reason == ("length" if d.selfies.count("]") == 2 else "stop") for d in short.designs)
    _assert_valid(short)


def test_the_derived_token_budget_shrinks_to_the_context_and_a_given_one_is_refused(model):
    config = model.llm.config
    context = config.max_position_embeddings
    config.max_position_embeddings = 160  # a short context: 100 symbols' worth of tokens do not fit
    try:
        report = design_molecules(model, n=4, seed=3, budget=4, batch_size=4)
        assert report.sampled == 4
        _assert_valid(report)
        with pytest.raises(PromptTooLong, match="max_tokens=400"):
            design_molecules(model, n=4, seed=3, budget=4, batch_size=4, max_tokens=400)
    finally:
        config.max_position_embeddings = context


def test_the_same_seed_gives_the_same_designs_whatever_the_batch_size(model):
    one = design_molecules(model, n=6, seed=7, budget=6, batch_size=6)
    two = design_molecules(model, n=6, seed=7, budget=6, batch_size=4)
    other = design_molecules(model, n=6, seed=8, budget=6, batch_size=6)
    assert [d.selfies for d in one.designs] == [d.selfies for d in two.designs]
    assert [d.selfies for d in one.designs] != [d.selfies for d in other.designs]


def test_guided_sampling_is_valid_seeded_and_differs_from_plain_sampling(model):
    conditions = parse_conditions("logP 1-3, MW < 450")
    kwargs = dict(n=6, conditions=conditions, seed=7, budget=6)
    plain = design_molecules(model, batch_size=6, **kwargs)
    guided = design_molecules(model, batch_size=6, guidance=3.0, **kwargs)
    again = design_molecules(model, batch_size=4, guidance=3.0, **kwargs)
    _assert_valid(guided)
    assert [d.selfies for d in guided.designs] == [d.selfies for d in again.designs]
    assert [d.selfies for d in guided.designs] != [d.selfies for d in plain.designs]
    # scale 1 is the model as it is; nothing to guide against without conditions or a target
    assert [d.selfies for d in design_molecules(model, batch_size=6, guidance=1.0, **kwargs).designs] == [
        d.selfies for d in plain.designs
    ]
    free = dict(n=4, seed=3, budget=4, batch_size=4)
    assert [d.selfies for d in design_molecules(model, guidance=3.0, **free).designs] == [
        d.selfies for d in design_molecules(model, **free).designs
    ]
    with pytest.raises(ValueError, match="--guidance must be a finite number at least 0, got -1"):
        design_molecules(model, n=1, guidance=-1.0)


def test_impossible_conditions_are_refused_before_sampling(model, reference):
    with pytest.raises(ConditionError, match=r"'logP 50' is outside what the training set reaches \(logP"):
        design_molecules(model, n=4, conditions=parse_conditions("logP 50"), reference=reference)


def test_without_a_reference_an_impossible_condition_is_reported_after_the_budget(model):
    report = design_molecules(model, n=4, conditions=parse_conditions("logP > 50"), budget=8, batch_size=8)
    assert report.sampled == 8 and report.summary()["met_conditions"] == 0
    assert report.summary()["conditions"] == ["logP at least 50"]


def test_duplicates_and_training_set_copies_are_counted(model):
    first = design_molecules(model, n=16, seed=0, budget=16, batch_size=16, temperature=0.3)
    assert first.duplicates == sum(d.duplicate for d in first.designs) > 0  # a cold random model repeats
    assert first.valid - first.duplicates == len({d.smiles for d in first.designs})
    copies = Reference.from_smiles([d.smiles for d in first.designs[:3]] + REFERENCE)
    again = design_molecules(model, n=16, seed=0, budget=16, batch_size=16, temperature=0.3, reference=copies)
    expected = len({d.smiles for d in first.designs[:3]})
    assert again.in_reference == expected and again.summary()["in_training_set"] == expected


def test_a_target_protein_goes_in_as_a_protein_input(model):
    plain = design_molecules(model, n=4, seed=5, budget=4, batch_size=4)
    targeted = design_molecules(model, n=4, seed=5, budget=4, batch_size=4, target="MKTAYIAKQRQISFVKSHFSRQ")
    _assert_valid(targeted)
    assert [d.selfies for d in plain.designs] != [d.selfies for d in targeted.designs]
    with pytest.raises(InvalidInput, match="protein"):
        design_molecules(model, n=1, target="MKT1AY")
    no_protein = tiny_model(["molecule"], seed=0)
    with pytest.raises(ValueError, match="--target: this model has no protein encoder"):
        design_molecules(no_protein, n=1, target="MKTAYIAKQR")


def test_condition_parsing_and_its_errors():
    parsed = parse_conditions("logP 1-3, MW < 450, QED > 0.6, HBD < 3, TPSA 40 to 90")
    assert [c.text() for c in parsed] == [
        "logP 1 to 3", "MW at most 450", "QED at least 0.6", "HBD at most 2", "TPSA 40 to 90"
    ]
    assert parse_conditions("logp -1.5 - 2") [0].low == -1.5
    assert parse_conditions(None) == [] and parse_conditions("  ") == []
    for text, message in [
        ("logP 1-", r"'logP 1-' is not written like"),
        ("potency > 3", r"unknown property 'potency' \(known: logP, MW"),
        ("logP 3-1", r"the interval is empty"),
        ("logP 1-3, logP 2-4", r"logP is named twice"),
        ("logP 1-3,,MW < 400", r"an empty part"),
    ]:
        with pytest.raises(ConditionError, match=message):
            parse_conditions(text)


def test_the_prompt_names_target_and_conditions():
    conditions = parse_conditions("logP 1-3, QED > 0.6")
    assert design_prompt(conditions, target=True) == (
        "Design a drug-like molecule that binds <protein> with logP 1 to 3, QED at least 0.6. Answer in SELFIES."
    )


def test_the_constraint_holds_over_a_bpe_tokenizer_whose_tokens_cross_symbols():
    """A BPE vocabulary learnt on SELFIES has tokens like ``][C`` and ``Bra``: random logits, masked,
    must still only ever spell alphabet symbols, and end only between symbols.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kiban.design.selfies_decoding import encode_selfies

    corpus = [encode_selfies(s) for s in REFERENCE] * 20
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("\n", "removed")
    core.decoder = decoders.Fuse()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>")
    constraint = SelfiesConstraint(tokenizer)
    crossing = [t for t in constraint.token_text.values() if "][" in t or (len(t) > 1 and "[" not in t and "]" not in t)]
    assert crossing, "the BPE vocabulary should hold tokens that cross or split symbols"
    rng = random.Random(0)
    alphabet = set(default_alphabet())
    for _ in range(30):
        ids: list[int] = []
        for _ in range(40):
            logits = torch.tensor([rng.gauss(0, 3) for _ in range(len(tokenizer))])
            token = int(constraint(ids, logits).argmax())
            if token == tokenizer.eos_token_id:
                break
            ids.append(token)
        text = constraint.text_of(tokenizer.decode(ids))
        symbols = split_symbols(text)
        assert "".join(symbols) == text and set(symbols) <= alphabet
        if token == tokenizer.eos_token_id:
            assert text == tokenizer.decode(ids) and symbols


def test_a_model_with_the_properties_encoder_reads_the_conditions_as_numbers():
    # two models alike but for their properties encoder: the same request and seed design
    # differently, so the conditions reached the model through the <properties> input
    conditions = parse_conditions("MW at most 300, logP 1-3")
    designs = []
    for scale in (1.0, 50.0):
        model = tiny_model(["properties"], seed=0).eval()
        with torch.no_grad():
            for param in model.llm.parameters():
                if param.dim() == 2:
                    param.mul_(20.0)
            for param in model.encoders["properties"].parameters():
                param.mul_(scale)
        report = design_molecules(model, n=6, conditions=conditions, seed=3, budget=6, batch_size=6)
        _assert_valid(report)
        designs.append([d.selfies for d in report.designs])
    assert designs[0] != designs[1]

"""Tests of the DNA encoder: tokenization, reverse complement, strand averaging, shapes, bad input,
Hugging Face loading.
"""

from __future__ import annotations

import itertools
import logging
import pickle

import pytest
import torch
import transformers
from Bio.Seq import Seq
from Bio.Seq import reverse_complement as bio_reverse_complement
from Bio.SeqRecord import SeqRecord

from kiban.encoders import InvalidInput, create_encoder
from kiban.encoders.dna import DnaEncoder, DnaFeaturizer, reverse_complement

# Own vocabulary: [PAD]0 [UNK]1 [CLS]2 [SEP]3 [MASK]4, A5 C6 G7 T8 N9, then k-mers from 10 in
# lexicographic order over ACGT (k-mer id = 10 + its base-4 number with A=0, C=1, G=2, T=3).
CLS, SEP, UNK = 2, 3, 1
A, C, G, T, N = 5, 6, 7, 8, 9


def kmer_id(kmer: str) -> int:
    return 10 + int(kmer.translate(str.maketrans("ACGT", "0123")), 4)


def tokens(featurizer: DnaFeaturizer, item) -> list[int]:
    return featurizer(item)["tokens"].tolist()


@pytest.fixture
def encoder() -> DnaEncoder:
    torch.manual_seed(0)
    return create_encoder("dna", preset="tiny").eval()


# ----------------------------------------------------------------------------------------------
# Tokenization


def test_base_tokenization() -> None:
    featurizer = DnaFeaturizer(tokenization="base")
    assert tokens(featurizer, "ACGTN") == [CLS, A, C, G, T, N, SEP]
    # Lower case, U read as T, IUPAC ambiguity codes read as N, outer whitespace stripped.
    assert tokens(featurizer, " acguRYSWKMBDHV\n") == [CLS, A, C, G, T] + [N] * 10 + [SEP]


def test_kmer_tokenization_non_overlapping() -> None:
    featurizer = DnaFeaturizer(tokenization="kmer", k=3)
    assert kmer_id("ACG") == 16 and kmer_id("TTG") == 72
    # Two full 3-mers, then the leftover bases one by one (Nucleotide Transformer rule).
    assert tokens(featurizer, "ACGTTGCA") == [CLS, 16, 72, C, A, SEP]
    # A window holding N is read base by base, and reading resumes right after the N.
    assert tokens(featurizer, "ACNGTTA") == [CLS, A, C, N, kmer_id("GTT"), A, SEP]


def test_kmer_tokenization_overlapping() -> None:
    featurizer = DnaFeaturizer(tokenization="kmer", k=3, overlapping=True)
    assert tokens(featurizer, "ACGTA") == [CLS, 16, 37, 54, SEP]  # ACG, CGT, GTA
    assert tokens(featurizer, "ACNGT") == [CLS, UNK, UNK, UNK, SEP]  # DNABERT: windows with N are [UNK]
    assert tokens(featurizer, "AC") == [CLS, A, C, SEP]  # shorter than k: single bases


def test_six_mer_vocabulary_and_seqrecord_and_pickle() -> None:
    featurizer = DnaFeaturizer(tokenization="kmer", k=6)
    assert featurizer.vocab_size == 10 + 4**6
    record = SeqRecord(Seq("ACGTTTACGNNACGTAGCT"), id="chr1:100-119")
    expected = [CLS, kmer_id("ACGTTT"), A, C, G, N, N, kmer_id("ACGTAG"), C, T, SEP]
    assert tokens(featurizer, record) == expected
    assert tokens(pickle.loads(pickle.dumps(featurizer)), record) == expected


def test_rc_augment_is_reproducible_with_a_generator() -> None:
    sequence = "GAAAA"  # first token G, or T on the reverse strand
    never, always = DnaFeaturizer(tokenization="base"), DnaFeaturizer(tokenization="base", rc_augment=1.0)
    assert tokens(always, sequence) == tokens(never, reverse_complement(sequence))
    half = DnaFeaturizer(tokenization="base", rc_augment=0.5)
    runs = [
        [half(sequence, generator=generator)["tokens"][1].item() for _ in range(20)]
        for generator in (torch.Generator().manual_seed(7), torch.Generator().manual_seed(7))
    ]
    assert runs[0] == runs[1]
    assert set(runs[0]) == {G, T}  # both strands were drawn


# ----------------------------------------------------------------------------------------------
# Reverse complement


def test_reverse_complement() -> None:
    assert reverse_complement("AACGTN") == "NACGTT"
    assert reverse_complement("acgU") == "Acgt"
    iupac = "ACGTNRYSWKMBDHVacgtnryswkmbdhv"
    assert reverse_complement(iupac) == str(bio_reverse_complement(Seq(iupac)))
    assert reverse_complement(reverse_complement(iupac)) == iupac
    with pytest.raises(ValueError, match="'1'"):
        reverse_complement("AC1")


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("item", "words"),
    [
        ("", ["'': is empty"]),
        ("ACGT1XZ-", ["'ACGT1XZ-'", "'1', 'X', 'Z', '-'", "positions 5, 6, 7, 8"]),
        ("ACG TA", ["' '", "positions 4"]),
        (None, ["'None'", "of type NoneType"]),
    ],
)
def test_bad_input_raises_invalid_input_naming_it(item, words) -> None:
    with pytest.raises(InvalidInput) as raised:
        DnaFeaturizer()(item)
    assert raised.value.modality == "dna"
    for word in words:
        assert word in str(raised.value)


def test_bad_seqrecord_is_named_by_its_id() -> None:
    with pytest.raises(InvalidInput, match="'contig_9'.*'E'"):
        DnaFeaturizer()(SeqRecord(Seq("ACGE"), id="contig_9"))


def test_over_long_is_rejected_or_truncated(caplog) -> None:
    with pytest.raises(
        InvalidInput, match="is 30 bases long \\(5 tokens\\), over max_length 4 tokens; set truncate"
    ):
        DnaFeaturizer(k=6, max_length=4)("ACGTAC" * 5, item_id="read 1")
    with caplog.at_level(logging.WARNING, logger="kiban.encoders.dna"):
        cropped = tokens(DnaFeaturizer(k=6, max_length=4, truncate=True), "ACGTAC" * 5)
    assert cropped == [CLS] + [kmer_id("ACGTAC")] * 4 + [SEP]
    assert "cropped" in caplog.text


# ----------------------------------------------------------------------------------------------
# Encoder


def test_forward_shapes_and_mask(encoder: DnaEncoder) -> None:
    out = encoder.encode(["ACGTACGTTAGC", "ACG", "ACGTN" * 6])
    assert out.embeddings.shape == (3, 30, encoder.output_dim)
    assert out.lengths().tolist() == [12, 3, 30]
    assert torch.all(out.embeddings[~out.mask] == 0)
    assert torch.isfinite(out.embeddings).all()


@pytest.mark.parametrize("overrides", [{}, {"positions": "sinusoidal"}, {"tokenization": "kmer", "k": 3}])
def test_padding_does_not_change_embeddings(overrides) -> None:
    torch.manual_seed(0)
    encoder = create_encoder("dna", preset="tiny", **overrides).eval()
    short, long = "ACGTTAGCAT", "GATTACA" * 8
    alone = encoder.encode([short]).embeddings[0]
    batched = encoder.encode([short, long]).embeddings[0, : alone.shape[0]]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_every_trainable_parameter_gets_a_gradient(encoder: DnaEncoder) -> None:
    encoder.train()
    encoder.encode(["ACGTACGTTAGC", "ACG"]).pooled().sum().backward()
    assert [name for name, p in encoder.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize(
    ("overrides", "sequence"),
    [
        ({}, "ACGGTTACNGATTACAGGR"),  # single bases
        ({"tokenization": "kmer", "k": 3, "overlapping": True}, "ACGGTTACNGATTACAGG"),
        ({"tokenization": "kmer", "k": 3}, "ACGGTTACAGATTACAGG"),  # length a multiple of k, no N
    ],
)
def test_strand_both_is_reverse_complement_invariant(overrides, sequence) -> None:
    torch.manual_seed(0)
    both = create_encoder("dna", preset="tiny", strand="both", **overrides).eval()
    forward, reverse = both.encode([sequence, reverse_complement(sequence)]).pooled()
    torch.testing.assert_close(forward, reverse, atol=1e-5, rtol=0)
    # Not trivially so: one strand alone differs.
    single = create_encoder("dna", preset="tiny", strand="forward", **overrides).eval()
    single.load_state_dict(both.state_dict())
    forward, reverse = single.encode([sequence, reverse_complement(sequence)]).pooled()
    assert not torch.allclose(forward, reverse, atol=1e-3)


def test_strand_both_averages_aligned_positions() -> None:
    torch.manual_seed(0)
    both = create_encoder("dna", preset="tiny", strand="both").eval()
    single = create_encoder("dna", preset="tiny").eval()
    single.load_state_dict(both.state_dict())
    sequence = "AACGTTTGCA"
    forward = single.encode([sequence]).embeddings[0]
    reverse = single.encode([reverse_complement(sequence)]).embeddings[0].flip(0)
    # Padding does not disturb the alignment either (the short sequence is padded here).
    averaged = both.encode([sequence, "ACGT" * 7]).embeddings[0, : len(sequence)]
    torch.testing.assert_close(averaged, (forward + reverse) / 2, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Hugging Face directory (Nucleotide Transformer layout: EsmForMaskedLM + EsmTokenizer over 6-mers)


@pytest.fixture
def nucleotide_transformer_dir(tmp_path):
    specials = ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>"]
    vocab = specials + ["".join(kmer) for kmer in itertools.product("ATCG", repeat=6)] + list("ATCGN")
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    transformers.EsmTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    config = transformers.EsmConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        position_embedding_type="absolute",
        emb_layer_norm_before=False,
        token_dropout=False,
        pad_token_id=1,
        mask_token_id=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    transformers.EsmForMaskedLM(config).save_pretrained(tmp_path)
    return tmp_path


def test_hugging_face_directory_matches_transformers(nucleotide_transformer_dir, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="kiban.encoders.dna"):
        encoder = create_encoder("dna", hf_path=str(nucleotide_transformer_dir)).eval()
    assert encoder.output_dim == 16
    # 40 positions, numbered from pad_id + 1 = 2, minus <cls> and <eos>: 36 tokens.
    assert encoder.featurizer.max_length == 36 and "lowered" in caplog.text

    tokenizer = transformers.AutoTokenizer.from_pretrained(nucleotide_transformer_dir, local_files_only=True)
    reference = transformers.AutoModel.from_pretrained(
        nucleotide_transformer_dir, local_files_only=True
    ).eval()
    sequences = ["ACGTTTACGNNACGTAGCTT", "GATTACAGATTACAGATTACAGATTACATTTT"]
    out = encoder.encode(sequences)
    for i, sequence in enumerate(sequences):
        ids = tokenizer(sequence, return_tensors="pt")["input_ids"]
        assert encoder.featurizer(sequence)["tokens"].tolist() == ids[0].tolist()
        with torch.no_grad():
            expected = reference(input_ids=ids).last_hidden_state[0, 1:-1]  # drop <cls>, <eos>
        assert out.lengths()[i] == expected.shape[0]
        torch.testing.assert_close(out.embeddings[i, : expected.shape[0]], expected, atol=1e-5, rtol=1e-5)

    with pytest.raises(InvalidInput, match="over max_length 36"):
        encoder.featurizer("ACGTAC" * 40)


def test_hugging_face_directory_with_both_strands(nucleotide_transformer_dir) -> None:
    encoder = create_encoder("dna", hf_path=str(nucleotide_transformer_dir), strand="both").eval()
    sequence = "ACGTTTACGCCAGATTAC"  # three 6-mers: the reverse strand tokenizes the same way
    forward, reverse = encoder.encode([sequence, reverse_complement(sequence)]).pooled()
    torch.testing.assert_close(forward, reverse, atol=1e-5, rtol=0)
    encoder.train()
    encoder.encode([sequence]).pooled().sum().backward()
    assert [name for name, p in encoder.named_parameters() if p.requires_grad and p.grad is None] == []


def test_a_fused_model_with_a_hugging_face_dna_encoder_saves_self_contained(nucleotide_transformer_dir, tmp_path_factory):
    import shutil

    from kiban.fusion import KibanModel
    from kiban.tiny import tiny_config

    config = tiny_config(["dna"])
    config.encoders["dna"] = {"preset": "tiny", "hf_path": str(nucleotide_transformer_dir)}
    model = KibanModel.from_config(config).eval()
    records = [{"messages": [{"role": "user", "content": "Is <dna> a promoter?"}], "inputs": {"dna": ["ACGTACGTTTGACA"]}}]
    with torch.no_grad():
        before = model(model.prepare(records)).logits
    saved = tmp_path_factory.mktemp("saved")
    model.save_pretrained(saved)
    shutil.rmtree(nucleotide_transformer_dir)  # the original directory is gone; the saved model has its own copy
    loaded = KibanModel.from_pretrained(saved).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(loaded.prepare(records)).logits, before, atol=0, rtol=0)

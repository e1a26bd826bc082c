from kiban.data import Rejects, detect_kind, read, read_sdf, read_smiles
from kiban.encoders.molecule import MoleculeFeaturizer


def _report(rejects):
    report = rejects.report()
    assert report.read == report.accepted + report.rejected
    return report


def test_nci_smiles_every_rdkit_failure_located_with_its_reason(nci):
    rejects = Rejects()
    records = list(read(nci / "first_5K.smi", rejects=rejects))
    report = _report(rejects)
    assert report.read == 4999 and len(records) == 4991
    assert report.by_reason == {"unparseable SMILES": 8}
    first = report.first_rejects[0]
    assert first.location == f"{nci / 'first_5K.smi'}:line 2098" and first.id == "2110"
    assert "valence" in first.detail
    assert records[0].id == "1" and records[0].item == "CC1=CC(=O)C=CC1=O"
    MoleculeFeaturizer()(records[0].item)


def test_nci_sdf_records_and_data_fields(nci):
    rejects = Rejects()
    records = list(read_sdf(nci / "first_200.props.sdf", rejects=rejects))
    assert len(records) == 200 and _report(rejects).rejected == 0
    assert records[0].location.endswith("record 1 (line 1)")
    assert "AMW" in records[0].fields and "M  END" in records[0].item
    features = MoleculeFeaturizer()(records[0].item)
    assert features["atom_features"].shape[0] == 9


def test_a_bad_row_in_a_csv_is_reported_and_the_rest_read(tmp_path):
    path = tmp_path / "mols.csv"
    path.write_text(
        "name,smiles,label\naspirin,CC(=O)Oc1ccccc1C(=O)O,1\nbroken,C1CC(,0\nshort,CCO\nethanol, CCO ,0\n"
    )
    rejects = Rejects()
    records = list(read(path, rejects=rejects))
    assert [(r.id, r.item, r.fields["label"]) for r in records] == [
        ("aspirin", "CC(=O)Oc1ccccc1C(=O)O", "1"),
        ("ethanol", "CCO", "0"),
    ]
    report = _report(rejects)
    assert {(r.id, r.reason, r.location) for r in report.first_rejects} == {
        ("broken", "unparseable SMILES", f"{path}:line 3"),
        ("short", "malformed table row", f"{path}:line 4"),
    }


def test_a_corrupt_sdf_block_is_reported_and_the_rest_read(tmp_path, nci):
    blocks = (nci / "first_200.props.sdf").read_text().split("$$$$\n")
    bad = "broken\n  RDKit\n\n  2  1  0  0  0  0  0  0  0  0999 V2000\n    0.0 0.0 0.0 C   0\nM  END\n"
    text = "$$$$\n".join(blocks[:3] + [bad] + blocks[3:6]) + "$$$$\n" + "cut\n  RDKit\n\n  1  0  0"
    (tmp_path / "x.sdf").write_text(text)
    rejects = Rejects()
    records = list(read(tmp_path / "x.sdf", rejects=rejects))
    assert len(records) == 6
    report = _report(rejects)
    assert report.by_reason == {"unreadable mol block": 1, "truncated record": 1}
    broken = next(r for r in report.first_rejects if r.reason == "unreadable mol block")
    assert broken.id == "broken" and ":record 4 (line " in broken.location


def test_shared_moleculenet_csvs(shared_data):
    esol = shared_data / "molecules/esol_delaney.csv"
    assert detect_kind(esol) == "smiles"
    rejects = Rejects()
    records = list(read(esol, rejects=rejects))
    assert len(records) == 1128 and records[0].id == "Amigdalin" and not records[0].item.endswith(" ")
    rejects = Rejects()
    records = list(read_smiles(shared_data / "molecules/tox21.csv", rejects=rejects))
    assert _report(rejects).by_reason == {"unparseable SMILES": 8} and len(records) == 7831 - 8

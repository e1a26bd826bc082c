"""The one data module: Lightning trains on it as is, predict reads every record once, resume is exact."""

import json
import subprocess
import sys

import pytest
import torch

from kiban.data import FeaturizerTransform, KibanDataModule, Record, RecordList, TrainBatch
from kiban.fusion import FusedBatch
from kiban.tiny import tiny_model


def _records(n):
    records = []
    for i in range(n):
        records.append(
            {
                "id": f"q{i}",
                "messages": [
                    {"role": "user", "content": f"Is <molecule> soluble? ({i})"},
                    {"role": "assistant", "content": "yes" if i % 2 else "no"},
                ],
                "inputs": {"molecule": ["C" * (1 + i % 7) + "O"]},
            }
        )
    records[3]["inputs"]["molecule"] = ["C1CC("]  # rejected with its line, training goes on
    return records


@pytest.fixture
def files(tmp_path):
    for split, n in (("train", 23), ("val", 6)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(n)))
    return tmp_path


def test_lightning_trains_on_the_datamodule_as_is_and_rejects_are_logged(files, caplog):
    import pytorch_lightning as pl

    model = tiny_model(["molecule"])

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model
            self.processor = model.processor  # the data module takes the processor from here
            self.ids = []

        def training_step(self, batch, index):
            assert isinstance(batch, TrainBatch) and isinstance(batch.inputs, FusedBatch)
            self.ids += batch.ids
            return self.model(batch.inputs).loss

        def validation_step(self, batch, index):
            self.log("val_loss", self.model(batch.inputs).loss, batch_size=len(batch))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    data = KibanDataModule(splits={"train": str(files / "train.jsonl"), "val": str(files / "val.jsonl")}, batch_size=4)
    module = Module()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    expected = sorted(f"q{i}" for i in range(23) if i != 3)
    assert sorted(module.ids) == sorted(expected * 2)  # every accepted record once per epoch
    rejected = [r for r in caplog.records if "rejected record q3" in r.getMessage()]
    assert rejected and "line 4" in rejected[0].getMessage() and "unparseable SMILES" in rejected[0].getMessage()


def test_predict_yields_every_id_once_over_ranks_with_workers(files):
    model = tiny_model(["molecule"])
    ids = []
    for rank in range(3):
        data = KibanDataModule(splits={"predict": str(files / "train.jsonl")}, batch_size=5, num_workers=2)
        data.attach(model.processor, rank=rank, world_size=3)
        ids += [i for batch in data.predict_dataloader() for i in batch.ids]
    assert sorted(ids) == sorted(f"q{i}" for i in range(23) if i != 3)


def test_a_resumed_loader_continues_at_the_next_batch_of_the_epoch(files):
    model = tiny_model(["molecule"])

    def loader(position=None):
        data = KibanDataModule(splits={"train": str(files / "train.jsonl")}, batch_size=4, seed=3)
        data.attach(model.processor, rank=0, world_size=1)
        if position:
            data.load_state_dict(position)
        return data

    full = loader()
    batches = list(full.loader("train"))
    first = loader()
    it = iter(first.loader("train"))
    for _ in range(2):
        first.batch_consumed(next(it))
    resumed = [b.ids for b in loader(first.state_dict()).loader("train")]
    assert resumed == [b.ids for b in batches[2:]]


def test_any_source_and_transform_feed_it_not_only_instruction_records():
    featurizer = tiny_model(["molecule"]).encoders["molecule"].featurizer
    smiles = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "C1CC(", "CCCC"]
    source = RecordList([Record(f"m{i}", "molecule", s, f"mols:{i}") for i, s in enumerate(smiles)])
    data = KibanDataModule(splits={"train": source}, batch_size=2, transform=FeaturizerTransform(featurizer))
    data.attach(rank=0, world_size=1)
    batches = list(data.loader("train"))
    assert sorted(i for b in batches for i in b.ids) == ["m0", "m1", "m2", "m3", "m5"]  # m4 rejected
    assert all(isinstance(b.inputs, dict) for b in batches)


def test_importing_the_data_layer_does_not_import_lightning():
    code = (
        "import sys, kiban.data\n"
        "from kiban.data import read, ShardedStream, ResumableBatches\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd="/"
    ).stdout
    assert out.strip() == "[]"

import json
import subprocess
import sys

import pytest
import torch

from kiban.data import KibanDataModule
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


def test_lightning_trains_on_the_datamodule_as_is_and_rejects_are_written(files):
    import pytorch_lightning as pl

    model = tiny_model(["molecule"])

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model
            self.batches = []

        def training_step(self, batch, index):
            assert isinstance(batch, FusedBatch)
            self.batches.append(batch.input_ids.shape[0])
            return self.model(batch).loss

        def validation_step(self, batch, index):
            self.log("val_loss", self.model(batch).loss, batch_size=batch.input_ids.shape[0])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    data = KibanDataModule(
        processor=model.processor,
        train=files / "train.jsonl",
        val=files / "val.jsonl",
        batch_size=4,
        output_dir=files / "run",
    )
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
    assert sum(module.batches) == 2 * 22  # every accepted record once per epoch
    assert data.streams["train"].epoch == 1  # the epoch reached the stream (new order each epoch)
    rejects = [json.loads(line) for line in (files / "run" / "rejects.jsonl").read_text().splitlines()]
    assert {(r["id"], r["location"].split(":")[-1], r["reason"]) for r in rejects} == {
        ("q3", "line 4", "unparseable SMILES")
    }
    counts = json.loads((files / "run" / "counts.json").read_text())
    assert counts["read"] == counts["accepted"] + counts["rejected"]
    assert {(p["split"], p["epoch"]) for p in counts["parts"]} == {
        ("train", 0),
        ("train", 1),
        ("val", 0),
        ("val", 1),
    }
    assert all(p["complete"] for p in counts["parts"])
    assert sum(p["read"] for p in counts["parts"] if p["split"] == "train") == 2 * 23


def test_predict_yields_ids_once_each_with_workers(files):
    model = tiny_model(["molecule"])
    data = KibanDataModule(
        processor=model.processor,
        predict=files / "train.jsonl",
        batch_size=5,
        num_workers=2,
        output_dir=files / "pred",
    )
    ids = [i for batch_ids, batch in data.predict_dataloader() for i in batch_ids]
    assert sorted(ids) == sorted(f"q{i}" for i in range(23) if i != 3)


def test_importing_the_data_layer_does_not_import_lightning():
    code = (
        "import sys, kiban.data\n"
        "from kiban.data import read, ShardedStream\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd="/"
    ).stdout
    assert out.strip() == "[]"

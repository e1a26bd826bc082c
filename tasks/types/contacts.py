"""``--type contacts``: a folder of PDB / mmCIF files, or its ``manifest.csv`` -> the supervised
pairwise contact head (saved; architecture "contact") vs. ESM-2's attention logistic regression
and the sequence-separation prior, split by structure (``kiban.tasks.contact_fitting.fit_contact_heads``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiban.tasks.heads import HeadConfig
from kiban.tasks.pipeline import (
    FinetuneOptions,
    TaskType,
    register_task_type,
    sample,
    save_head,
    write_metrics,
)

__all__ = ["run_contacts", "structure_files"]


def structure_files(data: Path) -> list[Path]:
    """The PDB / mmCIF files of a folder, or those a ``manifest.csv`` (column ``file``) names beside it."""
    if data.is_dir():
        files = sorted(p for p in data.iterdir() if p.suffix.lower() in (".pdb", ".cif", ".mmcif"))
    elif data.is_file():
        import pandas as pd

        frame = pd.read_csv(data)
        if "file" not in frame.columns:
            raise ValueError(f"{data}: a structure manifest needs a 'file' column")
        files = [data.parent / name for name in frame["file"].astype(str)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{data}: {len(missing)} listed structure file(s) missing, e.g. {missing[0]}")
    else:
        raise FileNotFoundError(f"no such folder or manifest: {data}")
    if not files:
        raise ValueError(f"{data}: no .pdb / .cif structure files")
    return files


def run_contacts(options: FinetuneOptions, work: Path) -> dict[str, Any]:
    """Structures -> the supervised pairwise contact head, saved, beside ESM-2's attention logistic
    regression and the separation prior (``contact_fitting.fit_contact_heads``); metrics.json and a
    contact-map plot of the first test chain.
    """
    from kiban.data import rejects_log
    from kiban.tasks.contact_fitting import fit_contact_heads
    from kiban.tasks.structure import ContactMapHead

    files = structure_files(Path(options.data))
    files = [files[i] for i in sample(len(files), options.max_rows, options.seed)]
    max_length = options.max_length_for("contacts")
    model = options.model_for(("protein",))
    encoder = model.encoders["protein"]
    with rejects_log(work) as rejects:
        report, pairwise = fit_contact_heads(
            encoder,
            files,
            seed=options.seed,
            max_length=max_length,
            pairwise_epochs=options.epochs_for("contacts"),
            plot=work / "plots" / "contact_map.png",
            progress=options.progress,
            rejects=rejects,
        )
    head = ContactMapHead(
        HeadConfig(
            task=options.task,
            modality="protein",
            kind="contact",
            architecture="contact",
            labels=["contact"],
            input_dim=encoder.output_dim,
            hidden_dim=pairwise.mlp[0].out_features,
            extra={
                "project": pairwise.project[1].out_features,
                "min_separation": 6,
                "contact_distance": 8.0,
                "trained_on": str(options.data),
                "seed": options.seed,
                "max_length": max_length,
            },
        )
    )
    head.net.load_state_dict(pairwise.state_dict())
    save_head(head, options, model, work)
    metrics = {
        "task": options.task,
        "type": "contacts",
        "kind": "contact",
        "data": str(options.data),
        "model": options.model,
        "n": len(files),
        "max_length": max_length,
        **report,
    }
    write_metrics(work / "metrics.json", metrics)
    return metrics


register_task_type(
    TaskType(
        name="contacts",
        run=run_contacts,
        description="a folder of PDB / mmCIF files, or its manifest.csv",
        modalities=("protein",),
        default_epochs=30,
        default_max_length=400,
        detect=lambda path, columns, options: path.is_dir() or path.name == "manifest.csv",
        folder=True,
        groups=False,
    )
)

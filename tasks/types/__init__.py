"""The ``kiban finetune`` task types, one module each, registered by name on import.

The import order is the ``--type auto`` order: a folder or manifest.csv -> contacts, .h5ad ->
cells, --drugs/--targets or SMILES + sequence columns -> dti, sequence + ss3/ss8 -> secondary,
any other table -> molecules. protein, dna, image, text and text-tags are named with --type.
Adding a type: one module that registers a ``kiban.tasks.pipeline.TaskType`` (a pooled head:
``kiban.tasks.pooled.pooled_type``), imported here, and a test over its real data.
"""

from kiban.tasks.types import contacts, cells, pairs, residues, molecules  # noqa: I001 - the auto-detection order
from kiban.tasks.types import dna, image, protein, tagging, text

__all__ = ["cells", "contacts", "dna", "image", "molecules", "pairs", "protein", "residues", "tagging", "text"]

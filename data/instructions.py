"""Instruction records: a chat that refers to its biological inputs by placeholder (JSONL).

One record a line (the full schema is in docs/data.md)::

    {"id": "q1",
     "messages": [{"role": "user", "content": "Does <molecule> inhibit <protein>?"},
                  {"role": "assistant", "content": "Yes, with an IC50 of 12 nM."}],
     "inputs": {"molecule": [{"smiles": "CC(=O)Oc1ccccc1C(=O)O"}],
                "protein": [{"fasta": "seqs/targets.fa", "id": "P23219"}]}}

The k-th ``<protein>`` of the chat binds to ``inputs["protein"][k]``. Each input is inline (a
sequence, a SMILES, a passage, ``{"genes", "values"}``) or a reference into a file (a FASTA or
GenBank id, an h5ad cell by obs name or row, an SDF record, an image path). Relative paths
resolve against the JSONL file's folder; no path may lead outside the dataset root (by default
that folder; symlinks are resolved first). Resolved records are exactly what
``KibanProcessor.process`` takes: ``{"id", "messages", "inputs": {modality: [raw item, ...]}}``.

A record that cannot be used (bad JSON, a missing message, a placeholder without its input, a
path outside the root or to a missing file, an unknown FASTA id, an input its modality's reader
rejects) is a reject located by file and line; the rest of the file is still read.

``InstructionSource`` gives random access by record index (byte offsets of the lines), which the
datasets use; referenced FASTA / h5ad / SDF files are opened once per process and cached.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiban.data._io import TruncatedFile, is_gzip, numbered_lines
from kiban.data.readers import UniqueIds, collector, register_reader
from kiban.data.rejects import Record, Reject, Rejects
from kiban.data.text import first_json_object, parse_json_line

__all__ = ["InstructionSource", "read_instructions", "resolve_path"]


class _Problem(Exception):
    """Why one record cannot be used: a reject reason and its detail."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(detail)


def resolve_path(value: Any, *, base: Path, root: Path) -> Path:
    """``value`` resolved against ``base`` (symlinks followed); it must be a file under ``root``."""
    if not isinstance(value, str) or not value.strip():
        raise _Problem("invalid record", f"a path must be a non-empty string, got {value!r}")
    if "\x00" in value:
        raise _Problem("invalid record", f"path {value!r} contains a NUL character")
    candidate = Path(value).expanduser()
    resolved = (candidate if candidate.is_absolute() else base / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise _Problem(
            "path outside dataset root",
            f"path {value!r} resolves to {resolved}, outside the dataset root {root}",
        )
    if not resolved.is_file():
        raise _Problem("missing file", f"path {value!r} ({resolved}) is not an existing file")
    return resolved


# ----------------------------------------------------------------------------------------------
# Files that inputs refer to, opened once per process


class _SequenceFile:
    """Sequence records of a FASTA or GenBank file by id; UniProt ``db|ACC|NAME`` ids also by ACC and NAME.

    An uncompressed FASTA is indexed by byte offset and read one record at a time; gzip FASTA
    and GenBank files are read whole (once per process).
    """

    def __init__(self, path: Path, kind: str) -> None:
        from kiban.data.sequences import read_fasta, read_genbank

        self.path = path
        self.offsets: dict[str, int] = {}
        self.records: dict[str, Any] = {}
        if kind == "fasta" and not is_gzip(path):
            with path.open("rb") as handle:
                offset = 0
                for line in handle:
                    if line.startswith(b">"):
                        words = line[1:].decode("utf-8", "replace").split(maxsplit=1)
                        for key in _aliases(words[0] if words else ""):
                            self.offsets.setdefault(key, offset)
                    offset += len(line)
        else:
            reader = read_fasta if kind == "fasta" else read_genbank
            for record in reader(path, rejects=Rejects()):  # bad records are left out: "unknown reference"
                for key in _aliases(record.id):
                    self.records.setdefault(key, record.item)

    def sequence(self, key: str) -> Any:
        """The SeqRecord named ``key`` (not yet checked against a residue rule)."""
        from kiban.data.sequences import fasta_record

        if key in self.records:
            return self.records[key]
        if key not in self.offsets:
            raise _Problem("unknown reference", f"no record {key!r} in {self.path.name}")
        with self.path.open("rb") as handle:
            handle.seek(self.offsets[key])
            lines = [handle.readline()]
            while (line := handle.readline()) and not line.startswith(b">"):
                lines.append(line)
        try:
            return fasta_record([line.decode("utf-8", "replace").rstrip("\r\n") for line in lines])
        except ValueError as error:
            raise _Problem("unreadable record", f"record {key!r} of {self.path.name}: {error}") from None


def _aliases(record_id: str) -> list[str]:
    parts = record_id.split("|")
    return [record_id, *parts[1:]] if len(parts) == 3 and parts[0] in ("sp", "tr") else [record_id]


class _Files:
    """The referenced files a process has opened: sequence indexes, h5ad readers, SDF records."""

    def __init__(self) -> None:
        self.sequences: dict[tuple[Path, str], _SequenceFile] = {}
        self.cells: dict[tuple[Any, ...], Any] = {}
        self.obs_rows: dict[tuple[Any, ...], dict[str, int]] = {}
        self.molecules: dict[Path, dict[str, str]] = {}

    def sequence_file(self, path: Path, kind: str) -> _SequenceFile:
        if (path, kind) not in self.sequences:
            self.sequences[path, kind] = _SequenceFile(path, kind)
        return self.sequences[path, kind]

    def cell(self, path: Path, spec: Mapping[str, Any]) -> Any:
        from kiban.data.cells import H5adReader

        key = (path, spec.get("layer"), bool(spec.get("use_raw", False)), spec.get("gene_key", "var_names"))
        if key not in self.cells:
            try:
                self.cells[key] = H5adReader(path, layer=key[1], use_raw=key[2], gene_key=key[3])
            except (OSError, KeyError, ValueError) as error:
                raise _Problem("unreadable h5ad", f"{path.name}: {type(error).__name__}: {error}") from None
        reader = self.cells[key]
        if "row" in spec:
            row = spec["row"]
            if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < len(reader):
                raise _Problem(
                    "unknown reference", f"row {row!r} is not a row of {path.name} (0..{len(reader) - 1})"
                )
        elif "obs" in spec:
            if key not in self.obs_rows:
                self.obs_rows[key] = {str(name): i for i, name in enumerate(reader.obs_names)}
            row = self.obs_rows[key].get(str(spec["obs"]))
            if row is None:
                raise _Problem("unknown reference", f"no cell {spec['obs']!r} in {path.name}")
        else:
            raise _Problem("invalid record", 'an h5ad input needs "obs" (a cell name) or "row" (0-based)')
        result = reader.read_many([row])[0]
        if isinstance(result, Reject):
            raise _Problem(result.reason, f"{result.location}: {result.detail}")
        return result.item

    def molecule(self, path: Path, key: str) -> str:
        from kiban.data.molecules import read_sdf

        if path not in self.molecules:
            self.molecules[path] = {record.id: record.item for record in read_sdf(path, rejects=Rejects())}
        if key not in self.molecules[path]:
            raise _Problem("unknown reference", f"no usable record {key!r} in {path.name}")
        return self.molecules[path][key]


# ----------------------------------------------------------------------------------------------
# Inputs, by modality: (spec from the JSONL, context) -> the raw item the featurizer takes


class _Context:
    def __init__(self, *, base: Path, root: Path, files: _Files) -> None:
        self.base, self.root, self.files = base, root, files

    def path(self, value: Any) -> Path:
        return resolve_path(value, base=self.base, root=self.root)


def _one_of(spec: Any, keys: Sequence[str], modality: str) -> str:
    if isinstance(spec, dict):
        for key in keys:
            if key in spec:
                return key
    forms = ", ".join(f'{{"{key}": ...}}' for key in keys)
    raise _Problem(
        "invalid record", f"a {modality} input must be a string or one of {forms}; got {_short(spec)}"
    )


def _strict(check: Callable[[Rejects], Any]) -> Any:
    """Run a reader check with a strict collector, turning its reject into a _Problem."""
    from kiban.data.rejects import DataError

    try:
        return check(Rejects(strict=True))
    except DataError as error:
        raise _Problem(error.reject.reason, error.reject.detail) from None


def _sequence_input(modality: str) -> Callable[[Any, _Context], Any]:
    def resolve(spec: Any, context: _Context) -> Any:
        from Bio.Seq import Seq
        from Bio.SeqRecord import SeqRecord

        from kiban.data.sequences import check_sequence

        if isinstance(spec, str):
            spec = {"sequence": spec}
        key = _one_of(spec, ("sequence", "fasta", "genbank"), modality)
        if key == "sequence":
            if not isinstance(spec["sequence"], str):
                raise _Problem("invalid record", f"a {modality} sequence must be a string")
            record = SeqRecord(Seq(spec["sequence"]), id=str(spec.get("id", "inline")))
        else:
            if not isinstance(spec.get("id"), str):
                raise _Problem("invalid record", f'a {key} reference needs an "id" string')
            record = context.files.sequence_file(context.path(spec[key]), key).sequence(spec["id"])
        return _strict(
            lambda rejects: check_sequence(record, modality=modality, location="", rejects=rejects)
        )

    return resolve


def _cell_input(spec: Any, context: _Context) -> Any:
    key = _one_of(spec, ("h5ad", "genes"), "cell")
    if key == "genes":
        if not isinstance(spec.get("values"), list) or not isinstance(spec["genes"], list):
            raise _Problem("invalid record", 'an inline cell needs "genes" and "values" lists')
        if len(spec["genes"]) != len(spec["values"]):
            raise _Problem(
                "invalid record",
                f"an inline cell has {len(spec['genes'])} genes but {len(spec['values'])} values",
            )
        return {"genes": spec["genes"], "values": spec["values"]}
    return context.files.cell(context.path(spec["h5ad"]), spec)


def _image_input(spec: Any, context: _Context) -> Any:
    from kiban.data.images import ImageProblem, image_stacks

    if isinstance(spec, str):
        spec = {"path": spec}
    _one_of(spec, ("path",), "image")
    path = context.path(spec["path"])
    try:
        stacks = dict(image_stacks(path))
    except ImageProblem as error:
        raise _Problem("unsupported image layout", f"{path.name}: {error}") from None
    except Exception as error:  # decoders raise many types
        raise _Problem(
            "unreadable image", f"{path.name} cannot be decoded ({type(error).__name__}: {error})"
        ) from None
    if len(stacks) == 1:
        return next(iter(stacks.values()))
    wanted = (f"[series {spec['series']}]" if "series" in spec else "") + (
        f"[t={spec['t']}]" if "t" in spec else ""
    )
    if wanted not in stacks:
        raise _Problem(
            "unknown reference",
            f"{path.name} holds {len(stacks)} images ({', '.join(stacks)}); "
            'choose one with "series" and/or "t"',
        )
    return stacks[wanted]


def _molecule_input(spec: Any, context: _Context) -> Any:
    from kiban.data.molecules import molecule_featurizer
    from kiban.encoders.base import InvalidInput

    if isinstance(spec, str):
        spec = {"smiles": spec}
    key = _one_of(spec, ("smiles", "molblock", "sdf"), "molecule")
    if key == "sdf":
        if not isinstance(spec.get("id"), str):
            raise _Problem("invalid record", 'an sdf reference needs an "id" string')
        return context.files.molecule(context.path(spec["sdf"]), spec["id"])
    item = spec[key]
    if not isinstance(item, str):
        raise _Problem("invalid record", f"a molecule's {key} must be a string")
    try:
        molecule_featurizer().parse(item.strip(), item_id=_short(item))
    except InvalidInput as error:
        raise _Problem(
            "unparseable SMILES" if key == "smiles" else "unreadable mol block", str(error)
        ) from None
    return item.strip() if key == "smiles" else item


def _text_input(spec: Any, context: _Context) -> Any:
    if isinstance(spec, str):
        spec = {"text": spec}
    _one_of(spec, ("text",), "text")
    if not isinstance(spec["text"], str) or not spec["text"].strip():
        raise _Problem("invalid record", "a text input must be a non-empty string")
    return spec["text"]


_RESOLVERS: dict[str, Callable[[Any, _Context], Any]] = {
    "protein": _sequence_input("protein"),
    "dna": _sequence_input("dna"),
    "cell": _cell_input,
    "image": _image_input,
    "molecule": _molecule_input,
    "text": _text_input,
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------------------------
# Records


def _modalities() -> list[str]:
    from kiban.encoders.base import list_encoders

    return list_encoders()


def resolve_record(
    value: Any, *, record_id: str, context: _Context, modalities: Sequence[str]
) -> dict[str, Any]:
    """A parsed JSONL value -> ``{"id", "messages", "inputs"}`` with raw items, or ``_Problem``."""
    if not isinstance(value, dict):
        raise _Problem("invalid record", f"a record must be a JSON object, got a JSON {type(value).__name__}")
    messages = value.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Problem("invalid record", '"messages" must be a non-empty list of {"role", "content"} objects')
    for i, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise _Problem("invalid record", f'message {i} needs a string "role" and a string "content"')
    inputs = value.get("inputs", {})
    if not isinstance(inputs, dict):
        raise _Problem("invalid record", '"inputs" must be an object: modality -> list of inputs')
    pattern = re.compile("<(" + "|".join(map(re.escape, modalities)) + ")>")
    wanted: dict[str, int] = {}
    for message in messages:
        for modality in pattern.findall(message["content"]):
            wanted[modality] = wanted.get(modality, 0) + 1
    resolved: dict[str, list[Any]] = {}
    for modality, items in inputs.items():
        if modality not in modalities:
            raise _Problem(
                "invalid record", f"unknown input modality {modality!r}; known: {', '.join(modalities)}"
            )
        items = items if isinstance(items, list) else [items]
        resolver = _RESOLVERS.get(modality, lambda spec, context: spec)
        out = []
        for k, spec in enumerate(items):
            try:
                out.append(resolver(spec, context))
            except _Problem as problem:
                raise _Problem(problem.reason, f"{modality} input {k + 1}: {problem.detail}") from None
        resolved[modality] = out
    for modality in sorted(set(wanted) | set(resolved)):
        n_placeholders, n_inputs = wanted.get(modality, 0), len(resolved.get(modality, []))
        if n_placeholders != n_inputs:
            raise _Problem(
                "placeholder mismatch",
                f"{n_placeholders} <{modality}> placeholder(s) in the messages "
                f"but {n_inputs} {modality} input(s)",
            )
    return {"id": record_id, "messages": messages, "inputs": resolved}


class InstructionSource:
    """Random access to the records of one instruction JSONL file.

    root: the folder no input path may leave (default: the JSONL file's folder).
    Indexes the byte offset of every non-blank line (gzip files are held in memory instead).
    Picklable: open files and caches are per process.
    """

    modality = "instruction"

    def __init__(self, path: str | Path, *, root: str | Path | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such file: {self.path}")
        self.base = self.path.resolve().parent
        self.root = Path(root).resolve() if root is not None else self.base
        self.truncated: TruncatedFile | None = None
        self._lines: list[str] | None = None
        if is_gzip(self.path):
            numbers, self._lines = [], []
            try:
                for number, line in numbered_lines(self.path):
                    if line.strip():
                        numbers.append(number)
                        self._lines.append(line)
            except TruncatedFile as error:
                self.truncated = error
            self.line_numbers = np.asarray(numbers, dtype=np.int64)
            self.sizes = np.asarray([len(line) for line in self._lines], dtype=np.int64)
        else:
            offsets, numbers, sizes = [], [], []
            with self.path.open("rb") as handle:
                offset = 0
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        offsets.append(offset)
                        numbers.append(number)
                        sizes.append(len(line))
                    offset += len(line)
            self.offsets = np.asarray(offsets, dtype=np.int64)
            self.line_numbers = np.asarray(numbers, dtype=np.int64)
            self.sizes = np.asarray(sizes, dtype=np.int64)
        self._pid = os.getpid()
        self._handle: Any = None
        self._files: _Files | None = None
        self._modalities: list[str] | None = None

    def __len__(self) -> int:
        return len(self.line_numbers)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_handle=None, _files=None)
        return state

    def lengths(self) -> np.ndarray:
        """The byte length of each record's line: a cheap stand-in for its token count, for bucketing."""
        return self.sizes

    def _local(self) -> None:
        """Open files and caches belong to one process: after a fork (DataLoader workers) start afresh,
        since a file offset shared with the parent would move under both.
        """
        if self._pid != os.getpid():
            self._pid, self._handle, self._files = os.getpid(), None, None

    def _text(self, index: int) -> str:
        if self._lines is not None:
            return self._lines[index]
        if self._handle is None:
            self._handle = self.path.open("rb")
        self._handle.seek(int(self.offsets[index]))
        return self._handle.readline().decode("utf-8", "replace").rstrip("\r\n")

    def read(self, index: int) -> Record | Reject:
        """Record ``index`` (0-based, blank lines not counted), resolved, or its reject."""
        self._local()
        if self._files is None:
            self._files = _Files()
            self._modalities = _modalities()
        location = f"{self.path}:line {int(self.line_numbers[index])}"
        value, problem = parse_json_line(self._text(index))
        if problem is not None:
            return Reject(None, location, "invalid JSON", problem)
        raw_id = value.get("id") if isinstance(value, dict) else None
        record_id = (
            str(raw_id)
            if raw_id is not None and str(raw_id).strip()
            else f"{self.path.name}:{int(self.line_numbers[index])}"
        )
        context = _Context(base=self.base, root=self.root, files=self._files)
        try:
            item = resolve_record(value, record_id=record_id, context=context, modalities=self._modalities)
        except _Problem as error:
            return Reject(record_id, location, error.reason, error.detail)
        except RecursionError:
            return Reject(record_id, location, "invalid record", "the record is nested too deeply")
        return Record(record_id, "instruction", item, location)

    def read_many(self, indices: Sequence[int]) -> list[Record | Reject]:
        """The resolved records (or rejects) of the lines at ``indices``, in that order."""
        return [self.read(int(i)) for i in indices]

    def __iter__(self) -> Iterator[Record | Reject]:
        for index in range(len(self)):
            yield self.read(index)


def _sniff_instructions(path: Path) -> bool:
    first = first_json_object(path)
    return isinstance(first, dict) and "messages" in first


@register_reader(
    "instructions",
    suffixes=(".jsonl", ".ndjson"),
    description="instruction records: chats with <modality> placeholders and their inputs (docs/data.md)",
    sniff=_sniff_instructions,
)
def read_instructions(
    path: str | Path, *, root: str | Path | None = None, rejects: Rejects | None = None
) -> Iterator[Record]:
    """Resolved instruction records of a JSONL file, in order (see ``InstructionSource``)."""
    rejects, ids = collector(rejects), UniqueIds()
    source = InstructionSource(path, root=root)
    for result in source:
        if isinstance(result, Reject):
            rejects.reject(id=result.id, location=result.location, reason=result.reason, detail=result.detail)
        elif ids.accept(result.id, result.location, rejects):
            rejects.accept()
            yield result
    if source.truncated is not None:
        rejects.reject(
            id=None,
            location=source.truncated.location,
            reason="truncated or corrupt file",
            detail=source.truncated.detail,
        )

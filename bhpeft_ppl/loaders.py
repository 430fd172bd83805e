"""Task data loaders: local files or Hugging Face Hub datasets into a :class:`datasets.DatasetDict`.

The project has three task kinds (:data:`TASKS`): ``sentiment`` and ``news`` are
classification (rows ``text: str``, ``label: ClassLabel``), ``commonsense`` is
multiple choice (rows ``question: str``, ``choices: list[str]`` with the same count per
row, ``label: ClassLabel`` over the choice letters, e.g. ``A``-``E``).

Files are parsed with the standard ``csv`` / ``json`` modules, so every problem is
reported with the file and its line (the header, where there is one, is line 1), and
the rows are then built in memory with :meth:`datasets.Dataset.from_dict` (nothing is
cached on disk).

File formats (``format=``):

``tsv``
    Tab-separated with a header line, no quoting (quotes are ordinary characters),
    e.g. GLUE SST-2 ``sentence<TAB>label``.
``csv``
    Comma-separated with a header line (standard double-quote quoting).
``csv_headerless``
    Comma-separated, no header, two fields per row: ``text,label`` (e.g. Hugging Face
    ``ag_news`` written to CSV).
``ag_news``
    The original AG News CSV: no header, ``class index (1-4),title,description``.
    ``text = title + " " + description`` and ``label = class index - 1``; label names
    come from a ``classes.txt`` beside the file (line ``i`` = class ``i``), else
    World / Sports / Business / Sci/Tech.
``jsonl``
    One JSON object per line with a text and a label field.
``commonsense_qa``
    CommonsenseQA JSONL, either the original nested layout
    (``{"answerKey", "id", "question": {"stem", "choices": [{"label", "text"}, ...]}}``)
    or the flat Hugging Face layout (``{"question": str, "choices": {"label": [...],
    "text": [...]}, "answerKey"}``); the layout is recognised row by row.
``hub``
    A Hugging Face Hub dataset id, read with :func:`datasets.load_dataset`.

``auto`` (the default) detects the format:

* a string that is not an existing path and looks like a Hub id (``name`` or
  ``owner/name``, no data-file extension) is a Hub id;
* ``.tsv`` is ``tsv``; ``.jsonl`` / ``.json`` is ``commonsense_qa`` when the first object has
  an ``answerKey`` or a ``choices`` field, else ``jsonl``;
* ``.csv`` (and any other extension whose first line has no tab) is decided by its first
  row: ``csv`` when a field names a known text or label column (or ``text_column`` /
  ``label_column``), ``ag_news`` when it has three fields and the first is an integer,
  ``csv_headerless`` when it has two fields and the second is an integer, else ``csv``;
  another extension whose first line has a tab is ``tsv``, one that starts with ``{`` is JSONL.

Columns: the text column is the first of :data:`TEXT_COLUMNS` in the header, the label
column the first of :data:`LABEL_COLUMNS` (case-insensitive), unless ``text_column`` /
``label_column`` name them.

Labels may be integers or strings. Without ``label_names``, string labels become the
sorted set of strings; integer labels ``0..C-1`` get the task's known names when they fit
(:data:`DEFAULT_LABEL_NAMES`: SST-2 ``negative``/``positive``, the four AG News classes)
and else ``"0"..."C-1"`` (``C`` = largest label + 1). With ``label_names``, labels that are
names map to their position and integer labels must lie in ``0..len(label_names)-1``;
anything else is an error.

Every problem a user can fix raises :class:`DataError` naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from datasets.utils.stratify import approximate_mode, stratified_shuffle_split_generate_indices

from .errors import BHPEFTError

TASKS: dict[str, str] = {"sentiment": "classification", "news": "classification", "commonsense": "multiple_choice"}
"""Task name -> task kind."""

FORMATS: tuple[str, ...] = ("auto", "tsv", "csv", "csv_headerless", "ag_news", "jsonl", "commonsense_qa", "hub")
"""Values accepted by ``format=``."""

TEXT_COLUMNS: tuple[str, ...] = ("text", "sentence", "review", "content", "document")
"""Text column names tried in order when ``text_column`` is not given."""

LABEL_COLUMNS: tuple[str, ...] = ("label", "labels", "score", "sentiment", "class")
"""Label column names tried in order when ``label_column`` is not given."""

AG_NEWS_CLASSES: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")
"""AG News class names, class index 1-4 in the original files (0-3 as labels)."""

DEFAULT_LABEL_NAMES: dict[str, tuple[str, ...]] = {"sentiment": ("negative", "positive"), "news": AG_NEWS_CLASSES}
"""Names of integer labels ``0..C-1`` per task, used when the labels fit and no names are given."""

SPLITS: tuple[str, ...] = ("train", "validation", "test")

_DATA_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".txt", ".parquet", ".arrow")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_INT = re.compile(r"[+-]?\d+")


class DataError(BHPEFTError, ValueError):
    """A data file or Hub dataset cannot be read as the task's data; the message names the file, line and fix."""


@dataclass(frozen=True)
class TaskData:
    """The splits of one task, ready for tokenisation.

    :param task: task name, a key of :data:`TASKS`.
    :param kind: ``"classification"`` or ``"multiple_choice"``.
    :param label_names: class names (classification) or choice letters (multiple choice).
    :param splits: ``"train"`` / ``"validation"`` / ``"test"`` datasets with identical features.
    :param sources: split -> the file path or Hub id it came from, or ``"split of <file>"``.
    :param seed: seed of the carved splits.
    """

    task: str
    kind: str
    label_names: tuple[str, ...]
    splits: datasets.DatasetDict
    sources: dict[str, str]
    seed: int

    @property
    def num_labels(self) -> int:
        """Number of classes (classification) or of choices per question (multiple choice)."""
        return len(self.label_names)

    def class_counts(self, split: str) -> dict[str, int]:
        """Rows per label name in ``split`` (names with no rows count 0), in label order."""
        counts = np.bincount(_label_array(self._split(split)), minlength=self.num_labels)
        return {name: int(c) for name, c in zip(self.label_names, counts, strict=True)}

    def subsample(self, split: str, n: int, seed: int | None = None) -> TaskData:
        """A new :class:`TaskData` whose ``split`` keeps ``n`` rows, stratified by label.

        Each class keeps ``n`` × its share of the rows, within one row (the classes'
        remainders are given out at random); the rows keep their order. Unchanged
        when ``n`` is at least the number of rows.

        :param split: the split to reduce.
        :param n: rows to keep (at least 1).
        :param seed: seed of the draw; ``None`` uses :attr:`seed`.
        """
        dataset = self._split(split)
        if int(n) < 1:
            raise DataError(f"cannot subsample split '{split}' to {n} rows; pass n >= 1")
        if n >= len(dataset):
            return dataclasses.replace(self, splits=datasets.DatasetDict(dict(self.splits)), sources=dict(self.sources))
        rng = np.random.default_rng(self.seed if seed is None else seed)
        labels = _label_array(dataset)
        _, inverse = np.unique(labels, return_inverse=True)
        take = approximate_mode(np.bincount(inverse), int(n), rng)
        chosen = [rng.permutation(np.flatnonzero(inverse == i))[:k] for i, k in enumerate(take)]
        reduced = dataset.select(np.sort(np.concatenate(chosen)))
        sources = dict(self.sources)
        sources[split] = f"{n}-row subsample of {self.sources.get(split, split)}"
        if split == "train" and self.kind == "classification":
            _check_two_classes(reduced, self.label_names, f"the {n}-row subsample of {self.sources.get(split, split)}")
        splits = datasets.DatasetDict(dict(self.splits))
        splits[split] = reduced
        return dataclasses.replace(self, splits=splits, sources=sources)

    def _split(self, split: str) -> datasets.Dataset:
        if split not in self.splits:
            raise DataError(f"task '{self.task}' has no split '{split}'; its splits are {sorted(self.splits)}")
        return self.splits[split]


# ----------------------------------------------------------------------------- public functions


def read_split(
    path_or_hub_id: str | os.PathLike,
    task: str,
    *,
    format: str = "auto",
    text_column: str | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    hub_split: str | None = None,
    require_labels: bool = True,
) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """Read one split of ``task`` from a file or a Hugging Face Hub dataset.

    :param path_or_hub_id: a data file, or a Hub dataset id such as ``"stanfordnlp/sst2"``.
    :param task: a key of :data:`TASKS`.
    :param format: one of :data:`FORMATS` (see the module docstring); ``"auto"`` detects it.
    :param text_column: the text column (files with a header, JSONL, Hub data).
    :param label_column: the label column (files with a header, JSONL, Hub data).
    :param label_names: the class names (or choice letters); labels outside them are an error.
    :param hub_split: the Hub split to load (default ``"train"``).
    :param require_labels: with ``False``, a classification file with a header (CSV, TSV,
        JSONL) may lack the label column (texts to predict); the dataset then has no
        ``label`` column and the returned label names are ``label_names`` (possibly ``None``).
    :returns: the dataset and its label names.
    :raises DataError: the file or its rows cannot be read as ``task`` data.
    """
    kind = _task_kind(task)
    _check_format(format)
    names = _check_label_names(label_names)
    return _read(
        path_or_hub_id, task, kind, format, text_column, label_column, names, "label_names", hub_split or "train", require_labels
    )


def load_task(
    task: str,
    train: str | os.PathLike | None = None,
    validation: str | os.PathLike | None = None,
    test: str | os.PathLike | None = None,
    *,
    format: str = "auto",
    text_column: str | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> TaskData:
    """Read the splits of ``task`` and carve the missing ones out of ``train``.

    The files are read in the order train, validation, test; the later ones must use the
    label names (choice letters) of the first, unless ``label_names`` is given. When
    ``train`` is given and ``test`` is not, ``round(test_fraction × rows)`` rows of train
    become the test split; then, when ``validation`` is not given,
    ``round(validation_fraction × rows)`` (of the original train rows) become the validation
    split. Both draws are stratified by label and seeded (the same split as
    ``Dataset.train_test_split(test_size=n, stratify_by_column="label", seed=seed)``), and the
    test split does not depend on ``validation_fraction``. A fraction of 0 carves nothing.

    Only ``test`` (or ``validation``) may be given, e.g. to evaluate; to train on a single
    file, pass it as ``train`` and let validation and test be carved out of it.

    :param task: a key of :data:`TASKS`.
    :param train: training file or Hub id (Hub split ``train``).
    :param validation: validation file or Hub id (Hub split ``validation``).
    :param test: test file or Hub id (Hub split ``test``).
    :param format: the format of every file (see the module docstring); ``"auto"`` detects it per file.
    :param text_column: see :func:`read_split`.
    :param label_column: see :func:`read_split`.
    :param label_names: see :func:`read_split`.
    :param validation_fraction: share of train rows carved out as validation, in ``[0, 1)``.
    :param test_fraction: share of train rows carved out as test, in ``[0, 1)``.
    :param seed: seed of the carved splits.
    :raises DataError: a file cannot be read, the splits disagree, the training split has a
        single class, or a split is too small to stratify.
    """
    kind = _task_kind(task)
    _check_format(format)
    names = _check_label_names(label_names)
    given = {name: value for name, value in zip(SPLITS, (train, validation, test), strict=True) if value is not None}
    if not given:
        raise DataError(f"no data given for task '{task}'; pass train= (and optionally validation=, test=) files or Hub ids")
    for name, fraction in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0 <= fraction < 1:
            raise DataError(f"{name}={fraction} is outside [0, 1); pass a share of the train rows such as 0.1")
    if validation_fraction + test_fraction >= 1:
        raise DataError(
            f"validation_fraction + test_fraction = {validation_fraction + test_fraction:g} leaves no training rows; "
            "make their sum < 1"
        )

    splits: dict[str, datasets.Dataset] = {}
    sources: dict[str, str] = {}
    names_from = "label_names"
    for split, value in given.items():
        dataset, read_names = _read(value, task, kind, format, text_column, label_column, names, names_from, split)
        splits[split] = dataset
        sources[split] = _source_name(value, split, format)
        if names is None:
            names, names_from = read_names, f"the {split} data {sources[split]}"
    assert names is not None

    first = next(iter(splits))
    for split, dataset in splits.items():
        if dataset.features != splits[first].features:
            raise DataError(
                f"the {split} data {sources[split]} has features {dataset.features} but the {first} data "
                f"{sources[first]} has {splits[first].features}; give files of the same task and label set"
            )

    if "train" in splits:
        train_source = sources["train"]
        if kind == "classification":
            _check_two_classes(splits["train"], names, train_source)
        total = len(splits["train"])
        for split, fraction in (("test", test_fraction), ("validation", validation_fraction)):
            if split in splits or fraction == 0:
                continue
            count = round(fraction * total)
            splits["train"], splits[split] = _carve(splits["train"], count, seed, names, train_source, split, fraction)
            sources[split] = f"split of {train_source}"
        if kind == "classification":
            _check_two_classes(splits["train"], names, f"the train split left after carving {train_source}")

    ordered = datasets.DatasetDict({split: splits[split] for split in SPLITS if split in splits})
    sources = {split: sources[split] for split in ordered}
    return TaskData(task=task, kind=kind, label_names=names, splits=ordered, sources=sources, seed=seed)


# ----------------------------------------------------------------------------- reading one split


def _read(
    value: str | os.PathLike,
    task: str,
    kind: str,
    format: str,
    text_column: str | None,
    label_column: str | None,
    label_names: tuple[str, ...] | None,
    names_from: str,
    hub_split: str,
    require_labels: bool = True,
) -> tuple[datasets.Dataset, tuple[str, ...]]:
    source = os.fspath(value)
    path = Path(source).expanduser()
    if format == "hub" or (format == "auto" and not path.exists() and _looks_like_hub_id(source)):
        return _read_hub(source, task, kind, hub_split, text_column, label_column, label_names, names_from)
    if not path.exists():
        raise DataError(f"{source}: no such file; check the path (data files are read from disk, nothing is copied)")
    if path.is_dir():
        raise DataError(f"{source}: is a directory; pass the data file inside it (e.g. train.tsv)")
    text = _read_text(path)
    fmt = _detect_format(path, text, text_column, label_column) if format == "auto" else format
    if (fmt == "commonsense_qa") != (kind == "multiple_choice"):
        wanted = "CommonsenseQA JSONL (nested or flat layout)" if kind == "multiple_choice" else "a classification file"
        raise DataError(
            f"{path}: read as format '{fmt}', but task '{task}' ({kind}) needs {wanted}; pass the right file or format"
        )
    if fmt == "commonsense_qa":
        if text_column is not None or label_column is not None:
            raise DataError(f"{path}: text_column / label_column do not apply to CommonsenseQA files; leave them unset")
        records = _parse_commonsense(path, text)
        return _choice_dataset(records, str(path), label_names, names_from)
    if fmt in ("csv_headerless", "ag_news") and (text_column is not None or label_column is not None):
        raise DataError(
            f"{path}: read as '{fmt}', which has no header line, so text_column / label_column cannot apply; "
            "leave them unset, or add a header line and pass format='csv'"
        )
    if fmt == "ag_news":
        locations, texts, labels, label_names, names_from = _parse_ag_news(path, text, label_names, names_from)
    elif fmt == "csv_headerless":
        locations, texts, labels = _parse_headerless(path, text)
    elif fmt == "jsonl":
        locations, texts, labels = _parse_jsonl(path, text, text_column, label_column, require_labels)
    else:
        locations, texts, labels = _parse_delimited(path, text, fmt, text_column, label_column, require_labels)
    if labels is None:
        return _unlabelled_dataset(str(path), locations, texts), label_names
    return _text_dataset(str(path), task, locations, texts, labels, label_names, names_from)


def _read_hub(
    hub_id: str,
    task: str,
    kind: str,
    split: str,
    text_column: str | None,
    label_column: str | None,
    label_names: tuple[str, ...] | None,
    names_from: str,
) -> tuple[datasets.Dataset, tuple[str, ...]]:
    source = f"{hub_id} (split {split})"
    try:
        dataset = datasets.load_dataset(hub_id, split=split)
    except Exception as error:  # offline, unknown id, unknown split, ...: all a user can fix
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataError(
            f"{hub_id}: could not load split '{split}' from the Hugging Face Hub ({type(error).__name__}: {detail}); "
            "check the id, the split and the network (HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 forbid downloads), "
            "or pass a local file (no file of that name exists)"
        ) from error
    columns = list(dataset.column_names)
    if len(dataset) == 0:
        raise DataError(f"{source}: has no rows; pick another split or dataset")
    if kind == "multiple_choice":
        needed = ("question", "choices", "answerKey")
        if any(c not in columns for c in needed):
            raise DataError(
                f"{source}: has columns {columns}, but multiple choice needs {list(needed)} (the tau/commonsense_qa layout); "
                "pass a CommonsenseQA-style dataset or file"
            )
        table = dataset.select_columns(list(needed)).to_dict()
        rows = [{c: table[c][i] for c in needed} for i in range(len(dataset))]
        records = [_choice_record(row, source, f"row {i}") for i, row in enumerate(rows, start=1)]
        return _choice_dataset(records, source, label_names, names_from)
    text_name = _pick_column(columns, text_column, TEXT_COLUMNS, "text", source)
    label_name = _pick_column(columns, label_column, LABEL_COLUMNS, "label", source)
    table = dataset.select_columns([text_name, label_name]).to_dict()
    feature = dataset.features[label_name]
    if label_names is None and isinstance(feature, datasets.ClassLabel):
        label_names, names_from = tuple(feature.names), f"the ClassLabel of {hub_id}"
    locations = [f"row {i}" for i in range(1, len(dataset) + 1)]
    return _text_dataset(source, task, locations, table[text_name], table[label_name], label_names, names_from)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: is empty; pass a file with data rows")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        byte = raw[error.start : error.start + 1].hex().upper()
        raise DataError(
            f"{path}, line {line}: byte 0x{byte} is not valid UTF-8; re-save the file as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8) or fix that line"
        ) from error
    return text.removeprefix("\ufeff")


def _detect_format(path: Path, text: str, text_column: str | None, label_column: str | None) -> str:
    suffix = path.suffix.lower()
    first_line = text.lstrip().split("\n", 1)[0]
    if suffix in (".jsonl", ".json") or (suffix not in (".tsv", ".csv") and first_line.startswith("{")):
        try:
            first = json.loads(first_line)
        except json.JSONDecodeError:
            return "jsonl"  # the parser names the line
        if isinstance(first, dict) and ("answerKey" in first or "choices" in first or isinstance(first.get("question"), dict)):
            return "commonsense_qa"
        return "jsonl"
    if suffix == ".tsv" or (suffix != ".csv" and "\t" in first_line):
        return "tsv"
    try:
        row = next(csv.reader(io.StringIO(text, newline="")), [])
    except csv.Error:
        return "csv"  # the parser names the line
    known = {c.lower() for c in (*TEXT_COLUMNS, *LABEL_COLUMNS)} | {c for c in (text_column, label_column) if c}
    if any(field.strip().lower() in known or field.strip() in known for field in row):
        return "csv"
    if len(row) == 3 and _INT.fullmatch(row[0].strip()):
        return "ag_news"
    if len(row) == 2 and _INT.fullmatch(row[1].strip()):
        return "csv_headerless"
    return "csv"


# ----------------------------------------------------------------------------- parsers


def _csv_rows(path: Path, text: str, **dialect) -> list[tuple[int, list[str]]]:
    """``(first line of the record, fields)`` for every non-blank record."""
    reader = csv.reader(io.StringIO(text, newline=""), **dialect)
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            raise DataError(f"{path}, line {start}: malformed CSV ({error}); fix the quoting of that line") from error
        if row:
            rows.append((start, row))
    return rows


def _optional_column(columns, label_column, source: str, required: bool, header: bool = True) -> str | None:
    try:
        return _pick_column(columns, label_column, LABEL_COLUMNS, "label", source, header=header)
    except DataError:
        if required or label_column is not None:
            raise
        return None


def _parse_delimited(
    path: Path, text: str, fmt: str, text_column: str | None, label_column: str | None, require_labels: bool = True
):
    dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
    rows = _csv_rows(path, text, **dialect)
    (_, header), body = rows[0], rows[1:]
    header = [h.strip() for h in header]
    text_index = header.index(_pick_column(header, text_column, TEXT_COLUMNS, "text", str(path)))
    label_name = _optional_column(header, label_column, str(path), require_labels)
    label_index = header.index(label_name) if label_name is not None else None
    if not body:
        raise DataError(f"{path}: has a header line but no rows; add data rows")
    separator = "tab" if fmt == "tsv" else "comma"
    locations, texts, labels = [], [], []
    for line, row in body:
        if len(row) != len(header):
            raise DataError(
                f"{path}, line {line}: has {len(row)} fields but the header has {len(header)}; "
                f"fix that line (a stray {separator}{' or quote' if fmt == 'csv' else ''}?)"
            )
        locations.append(f"line {line}")
        texts.append(row[text_index])
        labels.append(row[label_index] if label_index is not None else None)
    return locations, texts, (labels if label_index is not None else None)


def _parse_headerless(path: Path, text: str):
    locations, texts, labels = [], [], []
    for line, row in _csv_rows(path, text):
        if len(row) != 2:
            raise DataError(
                f"{path}, line {line}: has {len(row)} fields, expected 2 (text,label); quote texts that contain commas"
            )
        locations.append(f"line {line}")
        texts.append(row[0])
        labels.append(row[1])
    return locations, texts, labels


def _parse_ag_news(path: Path, text: str, label_names: tuple[str, ...] | None, names_from: str):
    classes_file = path.parent / "classes.txt"
    file_names = None
    if classes_file.is_file():
        file_names = tuple(line.strip() for line in classes_file.read_text(encoding="utf-8").splitlines() if line.strip())
        if not file_names:
            raise DataError(f"{classes_file}: is empty; write one class name per line (line i = class index i)")
    if label_names is None:
        label_names, names_from = file_names or AG_NEWS_CLASSES, str(classes_file) if file_names else "the AG News classes"
    elif file_names is not None and file_names != label_names:
        raise DataError(
            f"{classes_file}: names the classes {list(file_names)}, but the label names are {list(label_names)} "
            f"(from {names_from}); make them agree"
        )
    locations, texts, labels = [], [], []
    for line, row in _csv_rows(path, text):
        if len(row) != 3:
            raise DataError(
                f"{path}, line {line}: has {len(row)} fields, expected 3 (class index,title,description); fix that line"
            )
        index = row[0].strip()
        if not _INT.fullmatch(index) or not 1 <= int(index) <= len(label_names):
            raise DataError(
                f"{path}, line {line}: class index '{row[0]}' is not in 1..{len(label_names)} (classes {list(label_names)} "
                f"from {names_from}); fix that line"
            )
        locations.append(f"line {line}")
        texts.append(row[1] + " " + row[2])
        labels.append(int(index) - 1)
    return locations, texts, labels, label_names, names_from


def _json_objects(path: Path, text: str) -> list[tuple[int, dict]]:
    objects = []
    for line, content in enumerate(text.split("\n"), start=1):
        content = content.strip()
        if not content:
            continue
        try:
            value = json.loads(content)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}, line {line}: invalid JSON ({error.msg} at column {error.colno}); write one JSON object per line"
            ) from error
        if not isinstance(value, dict):
            raise DataError(
                f"{path}, line {line}: is a JSON {type(value).__name__}, not an object; write one JSON object per line"
            )
        objects.append((line, value))
    if not objects:
        raise DataError(f"{path}: has no rows; pass a file with data rows")
    return objects


def _parse_jsonl(path: Path, text: str, text_column: str | None, label_column: str | None, require_labels: bool = True):
    objects = _json_objects(path, text)
    keys = list(objects[0][1])
    text_name = _pick_column(keys, text_column, TEXT_COLUMNS, "text", str(path), header=False)
    label_name = _optional_column(keys, label_column, str(path), require_labels, header=False)
    locations, texts, labels = [], [], []
    for line, value in objects:
        for name in (text_name, label_name):
            if name is None:
                continue
            if name not in value:
                raise DataError(f"{path}, line {line}: has no field '{name}' (fields: {list(value)}); add it to that line")
        if not isinstance(value[text_name], str):
            raise DataError(
                f"{path}, line {line}: field '{text_name}' is a {type(value[text_name]).__name__}, not a string; fix that line"
            )
        locations.append(f"line {line}")
        texts.append(value[text_name])
        labels.append(value[label_name] if label_name is not None else None)
    return locations, texts, (labels if label_name is not None else None)


def _parse_commonsense(path: Path, text: str):
    return [_choice_record(value, str(path), f"line {line}") for line, value in _json_objects(path, text)]


def _choice_record(value: dict, source: str, where: str) -> tuple[str, str, list[str], list[str], str]:
    """``(where, question, choice texts, choice labels, answer key)`` of one nested- or flat-layout row."""
    question, choices = value.get("question"), None
    if isinstance(question, dict):  # original nested layout
        choices, question = question.get("choices"), question.get("stem")
    elif "choices" in value:  # flat Hugging Face layout
        choices = value["choices"]
    if isinstance(choices, dict) and isinstance(choices.get("label"), list) and isinstance(choices.get("text"), list):
        if len(choices["label"]) != len(choices["text"]):
            raise DataError(
                f"{source}, {where}: has {len(choices['label'])} choice labels but {len(choices['text'])} choice texts; fix it"
            )
        labels, texts = choices["label"], choices["text"]
    elif isinstance(choices, list) and all(isinstance(c, dict) and "label" in c and "text" in c for c in choices):
        labels, texts = [c["label"] for c in choices], [c["text"] for c in choices]
    else:
        raise DataError(
            f"{source}, {where}: is not a CommonsenseQA row (fields: {list(value)}); expected the nested layout "
            '{"answerKey", "question": {"stem", "choices": [{"label", "text"}]}} or the flat layout '
            '{"question": str, "choices": {"label": [...], "text": [...]}, "answerKey"}'
        )
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{source}, {where}: the question is empty; give every row a question")
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise DataError(f"{source}, {where}: a choice text is empty; give every choice a text")
    if "answerKey" not in value:
        raise DataError(
            f"{source}, {where}: has no answerKey; add the correct choice label (unlabelled test files cannot be used)"
        )
    return where, question, list(texts), [str(label) for label in labels], str(value["answerKey"])


# ----------------------------------------------------------------------------- building datasets


def _text_dataset(
    source: str,
    task: str,
    locations: list[str],
    texts: list,
    raw_labels: list,
    label_names: tuple[str, ...] | None,
    names_from: str,
) -> tuple[datasets.Dataset, tuple[str, ...]]:
    if not texts:
        raise DataError(f"{source}: has no rows; pass a file with data rows")
    for where, text in zip(locations, texts, strict=True):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{source}, {where}: the text is empty; remove that row or give it a text")
    labels, names = _encode_labels(source, task, locations, raw_labels, label_names, names_from)
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features), names


def _unlabelled_dataset(source: str, locations: list[str], texts: list) -> datasets.Dataset:
    if not texts:
        raise DataError(f"{source}: has no rows; pass a file with data rows")
    for where, text in zip(locations, texts, strict=True):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{source}, {where}: the text is empty; remove that row or give it a text")
    return datasets.Dataset.from_dict({"text": texts}, features=datasets.Features({"text": datasets.Value("string")}))


def _encode_labels(
    source: str,
    task: str,
    locations: list[str],
    raw_labels: list,
    label_names: tuple[str, ...] | None,
    names_from: str,
) -> tuple[list[int], tuple[str, ...]]:
    values: list[int | str] = []
    for where, value in zip(locations, raw_labels, strict=True):
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(value, str):
            value = value.strip()
        if not isinstance(value, int | str) or value == "":
            raise DataError(f"{source}, {where}: the label {value!r} is not an integer or a name; give that row a label")
        values.append(value)
    as_int = [v if isinstance(v, int) else (int(v) if _INT.fullmatch(v) else None) for v in values]

    if label_names is not None:
        position = {name: i for i, name in enumerate(label_names)}
        if all(str(v) in position for v in values):
            return [position[str(v)] for v in values], label_names
        if all(i is not None for i in as_int):
            for where, i in zip(locations, as_int, strict=True):
                if not 0 <= i < len(label_names):
                    raise DataError(
                        f"{source}, {where}: label {i} is outside 0..{len(label_names) - 1} (label names {list(label_names)} "
                        f"from {names_from}); fix that row or the label names"
                    )
            return as_int, label_names
        where, value = next((w, v) for w, v in zip(locations, values, strict=True) if str(v) not in position)
        raise DataError(
            f"{source}, {where}: label '{value}' is not one of the label names {list(label_names)} (from {names_from}); "
            "fix that row or declare the label in label_names"
        )

    if all(i is not None for i in as_int):
        for where, i in zip(locations, as_int, strict=True):
            if i < 0:
                raise DataError(
                    f"{source}, {where}: label {i} is negative; integer labels must be 0..C-1 "
                    "(-1 often marks an unlabelled test row: use a labelled split)"
                )
        top = max(as_int)
        defaults = DEFAULT_LABEL_NAMES.get(task)
        if defaults is not None and top < len(defaults):
            return as_int, defaults
        if 0 not in as_int:
            raise DataError(
                f"{source}: integer labels run from {min(as_int)} to {top} but no row has label 0; labels must count from 0: "
                "subtract 1 (or use format='ag_news' for the original AG News files), or pass label_names"
            )
        return as_int, tuple(str(i) for i in range(top + 1))

    names = tuple(sorted({str(v) for v in values}))
    position = {name: i for i, name in enumerate(names)}
    return [position[str(v)] for v in values], names


def _choice_dataset(
    records: list[tuple[str, str, list[str], list[str], str]],
    source: str,
    label_names: tuple[str, ...] | None,
    names_from: str,
) -> tuple[datasets.Dataset, tuple[str, ...]]:
    if not records:
        raise DataError(f"{source}: has no rows; pass a file with data rows")
    if label_names is None:
        label_names, names_from = tuple(records[0][3]), f"{records[0][0]} of {source}"
    count = len(label_names)
    questions, choices, labels = [], [], []
    for where, question, texts, keys, answer in records:
        if len(texts) != count:
            raise DataError(
                f"{source}, {where}: has {len(texts)} choices but {names_from} has {count} ({list(label_names)}); "
                "every question needs the same number of choices"
            )
        if answer not in keys:
            raise DataError(f"{source}, {where}: answerKey '{answer}' is not one of its choice labels {keys}; fix that row")
        questions.append(question)
        choices.append(texts)
        labels.append(keys.index(answer))
    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "choices": datasets.List(datasets.Value("string"), length=count),
            "label": datasets.ClassLabel(names=list(label_names)),
        }
    )
    return datasets.Dataset.from_dict(
        {"question": questions, "choices": choices, "label": labels}, features=features
    ), label_names


# ----------------------------------------------------------------------------- splitting and checks


def _carve(
    dataset: datasets.Dataset, count: int, seed: int, names: tuple[str, ...], source: str, split: str, fraction: float
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``count`` rows off ``dataset``, stratified by label, as ``train_test_split(test_size=count, seed=seed)`` would.

    ``Dataset.train_test_split(stratify_by_column=...)`` reads the label column row by row
    (seconds for SST-2's 67k rows); this calls the same index generator with the same
    random generator on the label array, so the rows are identical.
    """
    labels = _label_array(dataset)
    present, counts = np.unique(labels, return_counts=True)
    fix = f"pass a {split} file, or change {split}_fraction={fraction:g}"
    for label, n in zip(present, counts, strict=True):
        if n < 2:
            raise DataError(
                f"{source}: cannot carve a stratified {split} split: class '{names[label]}' has only {n} row; "
                f"stratifying needs at least 2 rows per class: add rows of that class or {fix}"
            )
    rest = len(dataset) - count
    if count < len(present) or rest < len(present):
        raise DataError(
            f"{source}: too small to carve a stratified {split} split of {count} rows out of {len(dataset)} rows with "
            f"{len(present)} classes (each part needs at least one row per class); {fix}"
        )
    rng = np.random.default_rng(seed)
    keep, out = next(stratified_shuffle_split_generate_indices(labels, rest, count, rng=rng))
    return dataset.select(keep), dataset.select(out)


def _check_two_classes(dataset: datasets.Dataset, names: tuple[str, ...], source: str) -> None:
    present = np.unique(_label_array(dataset))
    if len(present) < 2:
        found = names[present[0]] if len(present) else "nothing"
        raise DataError(
            f"{source}: the training split needs at least two classes; found only '{found}' in {len(dataset)} rows; "
            "pass a file with rows of every class"
        )


def _label_array(dataset: datasets.Dataset) -> np.ndarray:
    return np.asarray(dataset.select_columns(["label"])[:]["label"], dtype=np.int64)


# ----------------------------------------------------------------------------- small helpers


def _task_kind(task: str) -> str:
    if task not in TASKS:
        raise DataError(f"unknown task '{task}'; valid tasks: {', '.join(TASKS)}")
    return TASKS[task]


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise DataError(f"unknown format '{format}'; valid formats: {', '.join(FORMATS)}")


def _check_label_names(label_names: Sequence[str] | None) -> tuple[str, ...] | None:
    if label_names is None:
        return None
    if isinstance(label_names, str):
        raise DataError(f"label_names must be a sequence of names, not the string '{label_names}'; e.g. ['negative', 'positive']")
    names = tuple(str(name) for name in label_names)
    if not names or len(set(names)) != len(names):
        raise DataError(f"label_names {list(names)} must be non-empty and distinct")
    return names


def _looks_like_hub_id(value: str) -> bool:
    return bool(_HUB_ID.fullmatch(value)) and not value.lower().endswith(_DATA_SUFFIXES)


def _source_name(value: str | os.PathLike, split: str, format: str) -> str:
    source = os.fspath(value)
    path = Path(source).expanduser()
    if format == "hub" or (format == "auto" and not path.exists() and _looks_like_hub_id(source)):
        return f"{source} (split {split})"
    return str(path)


def _pick_column(
    columns: Sequence[str], wanted: str | None, candidates: tuple[str, ...], what: str, source: str, header: bool = True
) -> str:
    if wanted is not None:
        if wanted in columns:
            return wanted
        raise DataError(f"{source}: has no column '{wanted}' ({what}_column); columns found: {list(columns)}; pass one of them")
    lowered = {str(c).strip().lower(): c for c in reversed(list(columns))}
    for candidate in candidates:
        if candidate in lowered:
            return lowered[candidate]
    hint = " (if the file has no header line, add one)" if header else ""
    raise DataError(
        f"{source}: found no {what} column among {list(columns)}{hint}; expected one of {list(candidates)}, "
        f"or pass {what}_column= naming it"
    )

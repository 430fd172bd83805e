"""Task data loaders: the real SST-2 / AG News / CommonsenseQA files, seeded stratified splits, every user error.

The real files are read from ``../shared/data`` (relative to the project root, or
``$BHPEFT_DATA_DIR``); everything else uses small files written to ``tmp_path``.
Nothing is downloaded: the Hub path is exercised with a monkeypatched ``datasets.load_dataset``.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import datasets
import pytest

from bhpeft_ppl.errors import BHPEFTError
from bhpeft_ppl.loaders import TASKS, DataError, TaskData, load_task, read_split

DATA = Path(os.environ.get("BHPEFT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"real data directory {DATA} is missing (../shared/data beside the project, or set BHPEFT_DATA_DIR)"
)
AG_NAMES = ("World", "Sports", "Business", "Sci/Tech")


def write(directory: Path, name: str, content: str | bytes) -> Path:
    path = directory / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def tsv(directory: Path, rows: list[tuple[str, object]], name: str = "data.tsv", header: str = "sentence\tlabel") -> Path:
    return write(directory, name, header + "\n" + "".join(f"{text}\t{label}\n" for text, label in rows))


def nested_row(answer: str, labels: str = "ABCDE", stem: str = "Where is it?") -> str:
    choices = [{"label": label, "text": f"place {label}"} for label in labels]
    return json.dumps({"answerKey": answer, "id": "x", "question": {"question_concept": "c", "choices": choices, "stem": stem}})


def three_class_file(directory: Path) -> Path:
    """300 unique texts: 150 'a', 90 'b', 60 'c', interleaved."""
    labels = ["a"] * 150 + ["b"] * 90 + ["c"] * 60
    order = sorted(range(300), key=lambda i: (i * 7919) % 300)
    return tsv(directory, [(f"sentence number {i}", labels[i]) for i in order])


# ----------------------------------------------------------------------------- real data


@needs_data
def test_sst2_dev():
    dataset, names = read_split(DATA / "sst2" / "dev.tsv", "sentiment")
    assert len(dataset) == 872
    assert names == ("negative", "positive")
    assert dataset.features["label"].names == ["negative", "positive"]
    assert Counter(dataset["label"]) == {0: 428, 1: 444}
    assert dataset[0] == {"text": "it 's a charming and often affecting journey . ", "label": 1}


@needs_data
def test_sst2_train_reads_every_row():
    dataset, names = read_split(DATA / "sst2" / "train.tsv", "sentiment")
    assert len(dataset) == 67349
    assert names == ("negative", "positive")
    assert Counter(dataset["label"]) == {0: 29780, 1: 37569}


@needs_data
def test_ag_news_test_file():
    path = DATA / "ag_news" / "test.csv"
    dataset, names = read_split(path, "news")
    assert len(dataset) == 7600
    assert names == AG_NAMES == tuple((DATA / "ag_news" / "classes.txt").read_text().split("\n")[:4])
    assert Counter(dataset["label"]) == {0: 1900, 1: 1900, 2: 1900, 3: 1900}
    with path.open(newline="", encoding="utf-8") as handle:
        index, title, description = next(csv.reader(handle))
    assert dataset[0]["text"] == title + " " + description
    assert dataset[0]["label"] == int(index) - 1


@needs_data
def test_ag_news_hf_sample():
    dataset, names = read_split(DATA / "ag_news" / "lst11111_hf_sample" / "train.csv", "news")
    assert len(dataset) == 5000
    assert names == AG_NAMES
    assert Counter(dataset["label"]) == {0: 1259, 1: 1257, 2: 1281, 3: 1203}


@needs_data
def test_commonsense_nested_and_flat_layouts_agree():
    nested, nested_names = read_split(DATA / "commonsense_qa" / "dev_rand_split.jsonl", "commonsense")
    flat, flat_names = read_split(DATA / "commonsense_qa" / "hf_format" / "dev_rand_split.jsonl", "commonsense")
    assert len(nested) == len(flat) == 1221
    assert nested_names == flat_names == ("A", "B", "C", "D", "E")
    assert nested.features == flat.features
    assert nested.to_dict() == flat.to_dict()
    assert all(len(choices) == 5 for choices in nested["choices"])
    assert Counter(nested["label"]) == {0: 239, 1: 255, 2: 241, 3: 251, 4: 235}
    first = json.loads((DATA / "commonsense_qa" / "dev_rand_split.jsonl").read_text().split("\n")[0])
    assert nested[0]["question"] == first["question"]["stem"]
    assert nested[0]["choices"] == [c["text"] for c in first["question"]["choices"]]


@needs_data
def test_load_task_news_with_the_sample_as_train_and_the_test_file():
    data = load_task("news", train=DATA / "ag_news" / "lst11111_hf_sample" / "train.csv", test=DATA / "ag_news" / "test.csv")
    assert isinstance(data, TaskData)
    assert (data.task, data.kind, data.num_labels, data.label_names) == ("news", "classification", 4, AG_NAMES)
    assert list(data.splits) == ["train", "validation", "test"]
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 4500, "validation": 500, "test": 7600}
    assert data.sources["validation"] == f"split of {DATA / 'ag_news' / 'lst11111_hf_sample' / 'train.csv'}"
    assert data.sources["test"] == str(DATA / "ag_news" / "test.csv")


@needs_data
def test_load_task_carves_validation_and_test_out_of_one_file():
    data = load_task("news", train=DATA / "ag_news" / "test.csv", seed=3)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 5320, "validation": 760, "test": 1520}
    assert data.class_counts("test") == dict.fromkeys(AG_NAMES, 380)
    assert data.class_counts("validation") == dict.fromkeys(AG_NAMES, 190)
    assert set(data.sources.values()) == {str(DATA / "ag_news" / "test.csv"), f"split of {DATA / 'ag_news' / 'test.csv'}"}


@needs_data
def test_load_task_commonsense_train_nested_validation_flat():
    data = load_task(
        "commonsense",
        train=DATA / "commonsense_qa" / "train_rand_split.jsonl",
        validation=DATA / "commonsense_qa" / "hf_format" / "dev_rand_split.jsonl",
    )
    assert (data.kind, data.num_labels) == ("multiple_choice", 5)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 9741 - 1948, "validation": 1221, "test": 1948}
    assert sum(data.class_counts("train").values()) == 9741 - 1948


# ----------------------------------------------------------------------------- seeded stratified splits


def test_carved_splits_are_stratified_disjoint_and_sized(tmp_path):
    path = three_class_file(tmp_path)
    data = load_task("sentiment", train=path, seed=5)
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sizes == {"train": 210, "validation": 30, "test": 60}
    totals = {"a": 150, "b": 90, "c": 60}
    for split, fraction in (("validation", 0.1), ("test", 0.2), ("train", 0.7)):
        for name, count in data.class_counts(split).items():
            assert abs(count - fraction * totals[name]) <= 1, (split, name, count)
    texts = {split: set(data.splits[split]["text"]) for split in data.splits}
    assert (
        not texts["train"] & texts["validation"]
        and not texts["train"] & texts["test"]
        and not texts["validation"] & texts["test"]
    )
    assert len(texts["train"] | texts["validation"] | texts["test"]) == 300
    assert data.sources == {"train": str(path), "validation": f"split of {path}", "test": f"split of {path}"}


def test_carved_splits_are_seeded(tmp_path):
    path = three_class_file(tmp_path)
    first, again, other = (load_task("sentiment", train=path, seed=s) for s in (1, 1, 2))
    for split in ("train", "validation", "test"):
        assert first.splits[split]["text"][:] == again.splits[split]["text"][:]
    assert set(first.splits["test"]["text"]) != set(other.splits["test"]["text"])
    assert set(first.splits["validation"]["text"]) != set(other.splits["validation"]["text"])


def test_carved_test_split_equals_datasets_train_test_split(tmp_path):
    path = three_class_file(tmp_path)
    dataset, _ = read_split(path, "sentiment")
    expected = dataset.train_test_split(test_size=60, stratify_by_column="label", seed=11)
    data = load_task("sentiment", train=path, validation_fraction=0, seed=11)
    assert list(data.splits) == ["train", "test"]
    assert data.splits["test"]["text"][:] == expected["test"]["text"][:]
    assert data.splits["train"]["text"][:] == expected["train"]["text"][:]


def test_zero_fractions_carve_nothing_and_given_splits_are_kept(tmp_path):
    path = three_class_file(tmp_path)
    data = load_task("sentiment", train=path, validation=path, test_fraction=0)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 300, "validation": 300}
    only_test = load_task("sentiment", test=path)
    assert list(only_test.splits) == ["test"] and len(only_test.splits["test"]) == 300


def test_subsample_is_stratified_seeded_and_new(tmp_path):
    data = load_task("sentiment", train=three_class_file(tmp_path), validation_fraction=0, test_fraction=0)
    small = data.subsample("train", 50, seed=4)
    assert small is not data and len(data.splits["train"]) == 300
    assert len(small.splits["train"]) == 50
    for name, count in small.class_counts("train").items():
        assert abs(count - 50 * {"a": 150, "b": 90, "c": 60}[name] / 300) <= 1
    assert small.splits["train"]["text"][:] == data.subsample("train", 50, seed=4).splits["train"]["text"][:]
    assert set(small.splits["train"]["text"]) != set(data.subsample("train", 50, seed=5).splits["train"]["text"])
    assert small.sources["train"].startswith("50-row subsample of ")
    same = data.subsample("train", 1000)
    assert same.splits["train"]["text"][:] == data.splits["train"]["text"][:] and same.sources == data.sources
    assert data.class_counts("train") == {"a": 150, "b": 90, "c": 60}
    with pytest.raises(DataError, match="at least two classes"):
        data.subsample("train", 1)
    with pytest.raises(DataError, match="no split 'test'"):
        data.subsample("test", 5)


# ----------------------------------------------------------------------------- formats, columns and labels


def test_string_labels_get_sorted_names(tmp_path):
    path = tsv(tmp_path, [("a fine film", "great"), ("a dull film", "other"), ("superb", "great")])
    dataset, names = read_split(path, "sentiment")
    assert names == ("great", "other")
    assert dataset["label"][:] == [0, 1, 0]


def test_declared_label_names_set_the_order(tmp_path):
    path = tsv(tmp_path, [("good", "positive"), ("bad", "negative")])
    dataset, names = read_split(path, "sentiment", label_names=["positive", "negative"])
    assert names == ("positive", "negative") and dataset["label"][:] == [0, 1]
    ints = tsv(tmp_path, [("good", 1), ("bad", 0)], name="ints.tsv")
    dataset, names = read_split(ints, "sentiment", label_names=["bad", "good"])
    assert names == ("bad", "good") and dataset["label"][:] == [1, 0]


def test_integer_labels_without_known_names_are_numbered(tmp_path):
    path = tsv(tmp_path, [("one", 0), ("two", 2), ("three", 1)])
    _, names = read_split(path, "sentiment")
    assert names == ("0", "1", "2")


def test_tsv_keeps_double_quotes(tmp_path):
    path = tsv(tmp_path, [('he said "great" .', 1), ('"quoted start', 0), ('odd " quote', 1)])
    dataset, _ = read_split(path, "sentiment")
    assert dataset["text"][:] == ['he said "great" .', '"quoted start', 'odd " quote']


def test_crlf_line_ends_and_byte_order_mark(tmp_path):
    path = write(tmp_path, "win.tsv", "\ufeffsentence\tlabel\r\ngood\t1\r\nbad\t0\r\n")
    dataset, names = read_split(path, "sentiment")
    assert names == ("negative", "positive") and dataset.to_dict() == {"text": ["good", "bad"], "label": [1, 0]}
    path = write(tmp_path, "win.csv", "\ufefftext,label\r\ngood,1\r\n,0\r\n")
    with pytest.raises(DataError, match=r"win\.csv, line 3: the text is empty"):
        read_split(path, "sentiment")


def test_csv_with_custom_columns(tmp_path):
    path = write(tmp_path, "reviews.csv", 'id,body,stars\n1,"Loved it, really",good\n2,Hated it,bad\n')
    dataset, names = read_split(path, "sentiment", text_column="body", label_column="stars")
    assert names == ("bad", "good")
    assert dataset.to_dict() == {"text": ["Loved it, really", "Hated it"], "label": [1, 0]}


def test_column_detection_is_case_insensitive_and_ordered(tmp_path):
    path = write(tmp_path, "d.csv", "Content,Review,Sentiment\nx,the review,pos\ny,another,neg\n")
    dataset, _ = read_split(path, "sentiment")
    assert dataset["text"][:] == ["the review", "another"]


def test_generic_jsonl(tmp_path):
    rows = [
        {"sentence": "fine", "label": "yes", "extra": 1},
        {"sentence": "poor", "label": "no"},
        {"sentence": "ok", "label": "yes"},
    ]
    path = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    dataset, names = read_split(path, "sentiment")
    assert names == ("no", "yes")
    assert dataset.to_dict() == {"text": ["fine", "poor", "ok"], "label": [1, 0, 1]}


def test_auto_detects_headerless_and_ag_news_csv(tmp_path):
    headerless = write(tmp_path, "h.csv", '"Stocks rise, again",2\nA goal,1\n')
    dataset, names = read_split(headerless, "news")
    assert names == AG_NAMES and dataset.to_dict() == {"text": ["Stocks rise, again", "A goal"], "label": [2, 1]}
    original = tmp_path / "orig"
    original.mkdir()
    path = write(original, "test.csv", '"3","Title one","Desc, one."\n"1","Title two","Desc two"\n')
    dataset, names = read_split(path, "news")
    assert names == AG_NAMES and dataset.to_dict() == {"text": ["Title one Desc, one.", "Title two Desc two"], "label": [2, 0]}
    write(original, "classes.txt", "Red\nGreen\nBlue\n")
    dataset, names = read_split(path, "news")
    assert names == ("Red", "Green", "Blue") and dataset["label"][:] == [2, 0]


def test_explicit_format_overrides_detection(tmp_path):
    path = write(tmp_path, "data.txt", "text,label\nhello,1\nbye,0\n")
    dataset, _ = read_split(path, "sentiment", format="csv")
    assert len(dataset) == 2
    path = write(tmp_path, "plain.dat", "hello\t1\nbye\t0\n")
    with pytest.raises(DataError, match="no text column"):
        read_split(path, "sentiment")  # detected as TSV, whose first line is a header


def test_commonsense_row_layouts_and_features(tmp_path):
    flat = {"question": "Why?", "choices": {"label": ["1", "2", "3"], "text": ["a", "b", "c"]}, "answerKey": "3"}
    path = write(tmp_path, "q.jsonl", json.dumps(flat) + "\n" + nested_row("B", labels="ABC") + "\n")
    dataset, names = read_split(path, "commonsense")
    assert names == ("1", "2", "3")
    assert dataset["label"][:] == [2, 1]
    assert dataset.features["choices"] == datasets.List(datasets.Value("string"), length=3)


# ----------------------------------------------------------------------------- the Hub (no network: monkeypatched)


def test_hub_id_offline_is_a_clean_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'stanfordnlp/sst2' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"stanfordnlp/sst2: could not load split 'train'.*OfflineModeIsEnabled.*local file"):
        read_split("stanfordnlp/sst2", "sentiment")


def test_hub_columns_are_mapped(monkeypatch):
    calls = []

    def fake(hub_id, split):
        calls.append((hub_id, split))
        features = datasets.Features(
            {
                "idx": datasets.Value("int32"),
                "sentence": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["neg", "pos"]),
            }
        )
        return datasets.Dataset.from_dict(
            {"idx": [0, 1, 2], "sentence": ["good", "bad", "fine"], "label": [1, 0, 1]}, features=features
        )

    monkeypatch.setattr(datasets, "load_dataset", fake)
    dataset, names = read_split("someone/sst2", "sentiment", hub_split="validation")
    assert calls == [("someone/sst2", "validation")]
    assert names == ("neg", "pos") and dataset.to_dict() == {"text": ["good", "bad", "fine"], "label": [1, 0, 1]}
    data = load_task("sentiment", train="someone/sst2", validation="someone/sst2", test_fraction=0)
    assert calls[1:] == [("someone/sst2", "train"), ("someone/sst2", "validation")]
    assert data.sources == {"train": "someone/sst2 (split train)", "validation": "someone/sst2 (split validation)"}


def test_hub_multiple_choice_and_unlabelled_rows(monkeypatch):
    rows = {
        "id": ["a", "b"],
        "question": ["Q1?", "Q2?"],
        "question_concept": ["c", "c"],
        "choices": [{"label": ["A", "B"], "text": ["x", "y"]}, {"label": ["A", "B"], "text": ["z", "w"]}],
        "answerKey": ["B", ""],
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split: datasets.Dataset.from_dict(rows))
    with pytest.raises(
        DataError, match=r"tau/commonsense_qa \(split test\), row 2: answerKey '' is not one of its choice labels"
    ):
        read_split("tau/commonsense_qa", "commonsense", hub_split="test")
    rows["answerKey"][1] = "A"
    dataset, names = read_split("tau/commonsense_qa", "commonsense")
    assert names == ("A", "B") and dataset.to_dict() == {
        "question": ["Q1?", "Q2?"],
        "choices": [["x", "y"], ["z", "w"]],
        "label": [1, 0],
    }


# ----------------------------------------------------------------------------- errors


def test_errors_are_user_facing():
    assert issubclass(DataError, BHPEFTError) and issubclass(DataError, ValueError)


def test_unknown_task_and_format(tmp_path):
    with pytest.raises(DataError, match="unknown task 'sst'; valid tasks: sentiment, news, commonsense"):
        load_task("sst", train=tmp_path / "x.tsv")
    with pytest.raises(DataError, match=r"unknown format 'xlsx'; valid formats: auto, tsv, csv, .*commonsense_qa"):
        read_split(tmp_path / "x.tsv", "sentiment", format="xlsx")
    assert set(TASKS) == {"sentiment", "news", "commonsense"}


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"nope\.tsv: no such file"):
        read_split(tmp_path / "nope.tsv", "sentiment")
    with pytest.raises(DataError, match=r"no such file"):
        load_task("sentiment", train=str(tmp_path / "sub" / "train"))
    with pytest.raises(DataError, match="is a directory"):
        read_split(tmp_path, "sentiment")
    with pytest.raises(DataError, match="no data given"):
        load_task("sentiment")


def test_empty_and_header_only_files(tmp_path):
    with pytest.raises(DataError, match=r"empty\.tsv: is empty"):
        read_split(write(tmp_path, "empty.tsv", "\n  \n"), "sentiment")
    with pytest.raises(DataError, match=r"head\.tsv: has a header line but no rows"):
        read_split(write(tmp_path, "head.tsv", "sentence\tlabel\n"), "sentiment")
    with pytest.raises(DataError, match=r"blank\.jsonl: is empty"):
        read_split(write(tmp_path, "blank.jsonl", "\n\n"), "sentiment", format="jsonl")


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = write(tmp_path, "latin.tsv", b"sentence\tlabel\ngood\t1\n" + "café\t0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.tsv, line 3: byte 0xE9 is not valid UTF-8; re-save the file as UTF-8"):
        read_split(path, "sentiment")


def test_missing_columns_list_what_was_found(tmp_path):
    path = write(tmp_path, "cols.csv", "body,stars\nnice,1\n")
    with pytest.raises(DataError, match=r"cols\.csv: found no text column among \['body', 'stars'\].*text_column="):
        read_split(path, "sentiment")
    with pytest.raises(DataError, match=r"found no label column among \['body', 'stars'\].*label_column="):
        read_split(path, "sentiment", text_column="body")
    with pytest.raises(DataError, match=r"has no column 'review' \(text_column\); columns found: \['body', 'stars'\]"):
        read_split(path, "sentiment", text_column="review")
    jsonl = write(tmp_path, "rows.jsonl", json.dumps({"body": "x", "label": 1}) + "\n")
    with pytest.raises(DataError, match=r"rows\.jsonl: found no text column among \['body', 'label'\]"):
        read_split(jsonl, "sentiment")
    partial = write(tmp_path, "partial.jsonl", json.dumps({"text": "x", "label": 1}) + "\n" + json.dumps({"text": "y"}) + "\n")
    with pytest.raises(DataError, match=r"partial\.jsonl, line 2: has no field 'label'"):
        read_split(partial, "sentiment")


def test_labels_outside_the_declared_set(tmp_path):
    path = tsv(tmp_path, [("good", "positive"), ("meh", "neutral")])
    with pytest.raises(
        DataError, match=r"data\.tsv, line 3: label 'neutral' is not one of the label names \['negative', 'positive'\]"
    ):
        read_split(path, "sentiment", label_names=["negative", "positive"])
    ints = tsv(tmp_path, [("good", 1), ("odd", 2)], name="ints.tsv")
    with pytest.raises(DataError, match=r"ints\.tsv, line 3: label 2 is outside 0\.\.1"):
        read_split(ints, "sentiment", label_names=["negative", "positive"])
    negative = tsv(tmp_path, [("good", 1), ("hidden", -1)], name="neg.tsv")
    with pytest.raises(DataError, match=r"neg\.tsv, line 3: label -1 is negative"):
        read_split(negative, "sentiment")
    one_based = tsv(tmp_path, [("a", 1), ("b", 2), ("c", 3)], name="one.tsv")
    with pytest.raises(DataError, match=r"one\.tsv: integer labels run from 1 to 3 but no row has label 0"):
        read_split(one_based, "sentiment")
    missing = tsv(tmp_path, [("a", 1), ("b", " ")], name="nolabel.tsv")
    with pytest.raises(DataError, match=r"nolabel\.tsv, line 3: the label '' is not an integer or a name"):
        read_split(missing, "sentiment")
    ag = write(tmp_path, "ag.csv", '"2","t","d"\n"5","t","d"\n')
    with pytest.raises(DataError, match=r"ag\.csv, line 2: class index '5' is not in 1\.\.4"):
        read_split(ag, "news", format="ag_news")


def test_validation_labels_must_be_among_the_train_labels(tmp_path):
    train = tsv(tmp_path, [("a", "great"), ("b", "other"), ("c", "great"), ("d", "other")], name="train.tsv")
    validation = tsv(tmp_path, [("e", "great"), ("f", "awful")], name="dev.tsv")
    with pytest.raises(
        DataError, match=r"dev\.tsv, line 3: label 'awful' is not one of the label names \['great', 'other'\] \(from the train"
    ):
        load_task("sentiment", train=train, validation=validation, test_fraction=0)
    only_great = tsv(tmp_path, [("e", "great")], name="dev1.tsv")
    data = load_task("sentiment", train=train, validation=only_great, test_fraction=0)
    assert data.class_counts("validation") == {"great": 1, "other": 0}


def test_empty_text_and_field_counts(tmp_path):
    path = tsv(tmp_path, [("fine", 1), ("   ", 0)])
    with pytest.raises(DataError, match=r"data\.tsv, line 3: the text is empty"):
        read_split(path, "sentiment")
    path = write(tmp_path, "tabs.tsv", "sentence\tlabel\nfine\t1\nstray\ttab\t0\n")
    with pytest.raises(DataError, match=r"tabs\.tsv, line 3: has 3 fields but the header has 2"):
        read_split(path, "sentiment")
    path = write(tmp_path, "multi.csv", 'text,label\n"two\nlines",1\n"empty",\n')
    with pytest.raises(DataError, match=r"multi\.csv, line 4: the label '' is not an integer"):
        read_split(path, "sentiment")


def test_invalid_json_names_the_line(tmp_path):
    path = write(tmp_path, "bad.jsonl", json.dumps({"text": "a", "label": 0}) + '\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: invalid JSON"):
        read_split(path, "sentiment")
    path = write(tmp_path, "list.jsonl", "[1, 2]\n")
    with pytest.raises(DataError, match=r"list\.jsonl, line 1: is a JSON list, not an object"):
        read_split(path, "sentiment", format="jsonl")


def test_commonsense_row_errors(tmp_path):
    path = write(tmp_path, "csqa.jsonl", nested_row("A") + "\n" + nested_row("B", labels="ABCD") + "\n")
    with pytest.raises(DataError, match=r"csqa\.jsonl, line 2: has 4 choices but line 1 of .*csqa\.jsonl has 5"):
        read_split(path, "commonsense")
    path = write(tmp_path, "key.jsonl", nested_row("A") + "\n\n" + nested_row("F") + "\n")
    with pytest.raises(DataError, match=r"key\.jsonl, line 3: answerKey 'F' is not one of its choice labels"):
        read_split(path, "commonsense")
    path = write(tmp_path, "generic.jsonl", json.dumps({"question": "q", "label": 1}) + "\n")
    with pytest.raises(DataError, match=r"generic\.jsonl: read as format 'jsonl', but task 'commonsense'"):
        read_split(path, "commonsense")
    with pytest.raises(DataError, match=r"generic\.jsonl, line 1: is not a CommonsenseQA row"):
        read_split(path, "commonsense", format="commonsense_qa")
    train = write(tmp_path, "train.jsonl", "\n".join(nested_row(k) for k in "ABCDEABCDE") + "\n")
    dev = write(tmp_path, "dev.jsonl", nested_row("A", labels="ABCD") + "\n")
    with pytest.raises(DataError, match=r"dev\.jsonl, line 1: has 4 choices but the train data .*train\.jsonl has 5"):
        load_task("commonsense", train=train, validation=dev)
    with pytest.raises(DataError, match=r"data\.tsv: read as format 'tsv', but task 'commonsense'"):
        read_split(tsv(tmp_path, [("a", 1)]), "commonsense")


def test_training_split_needs_two_classes(tmp_path):
    path = tsv(tmp_path, [(f"good {i}", 1) for i in range(1000)], name="pos.tsv")
    with pytest.raises(
        DataError, match=r"pos\.tsv: the training split needs at least two classes; found only 'positive' in 1000 rows"
    ):
        load_task("sentiment", train=path)
    dataset, _ = read_split(path, "sentiment")  # a one-class file is fine as an evaluation split
    assert len(dataset) == 1000


def test_splits_too_small_to_stratify(tmp_path):
    path = tsv(tmp_path, [("a", 0), ("b", 1), ("c", 0), ("d", 1)], name="tiny.tsv")
    with pytest.raises(
        DataError, match=r"tiny\.tsv: too small to carve a stratified test split of 1 rows out of 4 rows with 2 classes"
    ):
        load_task("sentiment", train=path)
    path = tsv(tmp_path, [("a", 0)] * 20 + [("b", 1)], name="lone.tsv")
    with pytest.raises(DataError, match=r"lone\.tsv: cannot carve a stratified test split: class 'positive' has only 1 row"):
        load_task("sentiment", train=path)
    with pytest.raises(DataError, match=r"validation_fraction \+ test_fraction = 1 leaves no training rows"):
        load_task("sentiment", train=path, validation_fraction=0.5, test_fraction=0.5)

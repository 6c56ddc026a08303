"""Data: reading csv / tsv / jsonl files, token ids, and the batches the loop and DDP ranks use."""
import json
import os

import numpy as np
import pytest
import torch

import trainer
from config import GOLDEN_CONFIG, read_yaml
from conftest import base_args, make_tokenizer, sentiment_rows, write_csv, write_jsonl
from data import (
    DataError,
    Encoded,
    backend_encode,
    collate,
    count_examples,
    encode,
    eval_batches,
    example_chunks,
    id_dtype,
    micro_batches,
    read_examples,
    train_batches,
)

LABELS = ["negative", "positive"]
ROWS = [{"text": "good movie", "label": "positive"},
        {"text": "bad plot", "label": "negative"},
        {"text": "the film was great", "label": "positive"}]


def data_cfg(**overrides):
    """config.yaml's data section for a file of text / label columns."""
    return {**read_yaml(GOLDEN_CONFIG)["data"], "text_a_col": "text", "label_col": "label", **overrides}


# -- file formats --------------------------------------------------------------------------------


def test_csv_reads_texts_labels_and_columns(tmp_path):
    path = write_csv(tmp_path / "a.csv", [{"id": i, **row} for i, row in enumerate(ROWS)])
    examples = read_examples(path, data_cfg(labels_list=LABELS), need_labels=True)
    assert examples.columns == ["id", "text", "label"]
    assert examples.texts_a == ["good movie", "bad plot", "the film was great"]
    assert examples.texts_b is None
    assert examples.labels.tolist() == [1, 0, 1] and examples.labels.dtype == np.int64
    # the raw rows are for prediction output only: kept when asked for
    assert examples.rows is None
    kept = read_examples(path, data_cfg(labels_list=LABELS), need_labels=True, keep_rows=True)
    assert kept.rows[2] == {"id": "2", "text": "the film was great", "label": "positive"}


def test_tsv_keeps_commas_inside_texts(tmp_path):
    rows = [{"text": "good, very good", "label": "positive"}, {"text": "bad, sad", "label": "negative"}]
    path = write_csv(tmp_path / "a.tsv", rows, delimiter="\t")
    examples = read_examples(path, data_cfg(file_format="tsv", labels_list=LABELS), need_labels=True)
    assert examples.texts_a == ["good, very good", "bad, sad"]
    assert examples.labels.tolist() == [1, 0]


def test_jsonl_reads_objects_and_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n")
    examples = read_examples(path, data_cfg(file_format="jsonl", labels_list=LABELS), need_labels=True)
    assert examples.texts_a == [row["text"] for row in ROWS]
    assert examples.labels.tolist() == [1, 0, 1]


def test_quoted_newline_inside_a_csv_field(tmp_path):
    rows = [{"text": "good\nmovie", "label": "positive"}, {"text": "bad", "label": "negative"}]
    examples = read_examples(write_csv(tmp_path / "a.csv", rows), data_cfg(labels_list=LABELS), True)
    assert examples.texts_a == ["good\nmovie", "bad"]


def test_windows_line_endings(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"text,label\r\ngood,positive\r\nbad,negative\r\n")
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "good", "label": "positive"}\r\n{"text": "bad", "label": "negative"}\r\n')
    for name, fmt in (("a.csv", "csv"), ("a.jsonl", "jsonl")):
        examples = read_examples(str(tmp_path / name), data_cfg(file_format=fmt, labels_list=LABELS), True)
        assert examples.texts_a == ["good", "bad"] and examples.labels.tolist() == [1, 0]


@pytest.mark.parametrize("columns, message", [
    ({"text_a_col": 1}, "data.text_a_col and data.label_col are the same column 'label'"),
    ({"text_b_col": 1}, "data.text_b_col and data.label_col are the same column 'label'"),
    ({"text_b_col": 0}, "data.text_b_col and data.text_a_col are the same column 'text'"),
])
def test_a_column_named_once_by_name_and_once_by_position_is_refused(tmp_path, columns, message):
    # config.py refuses text_a_col: label with label_col: label; a position can name it too
    path = write_csv(tmp_path / "a.csv", ROWS)
    with pytest.raises(DataError, match=f"a.csv: {message}"):
        read_examples(path, data_cfg(**columns, labels_list=LABELS), need_labels=True)


def test_header_row_index_skips_the_rows_above(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("exported by some tool,\ntext,label\ngood,positive\nbad,negative\n")
    examples = read_examples(str(path), data_cfg(header=1, labels_list=LABELS), need_labels=True)
    assert examples.texts_a == ["good", "bad"]
    assert examples.labels.tolist() == [1, 0]


def test_header_null_names_columns_by_position(tmp_path):
    path = write_csv(tmp_path / "a.csv", ROWS, columns=["label", "text"], header=False)
    examples = read_examples(path, data_cfg(header=None, text_a_col=1, label_col=0, labels_list=LABELS), True)
    assert examples.columns == [0, 1]
    assert examples.texts_a == ["good movie", "bad plot", "the film was great"]
    assert examples.labels.tolist() == [1, 0, 1]


def test_sentence_pairs_read_both_texts_and_tokenize_as_pairs(tmp_path):
    rows = [{"premise": "the movie", "hypothesis": "good", "label": "positive"},
            {"premise": "it was", "hypothesis": "very bad", "label": "negative"}]
    path = write_csv(tmp_path / "a.csv", rows)
    cfg = data_cfg(text_a_col="premise", text_b_col="hypothesis")
    examples = read_examples(path, {**cfg, "labels_list": LABELS}, need_labels=True)
    assert examples.texts_b == ["good", "very bad"]
    encoded = encode(make_tokenizer(), examples, max_seq_len=16)
    # [CLS] it was [SEP] very bad [SEP]: the second text is segment 1
    assert encoded.token_type_ids[encoded.offsets[1]:].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert encoded.lengths.tolist() == [6, 7]


def test_numeric_labels_in_the_file_match_string_and_int_labels_list(tmp_path):
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": "nice", "label": 2}]
    csv_path = write_csv(tmp_path / "a.csv", rows)
    jsonl_path = write_jsonl(tmp_path / "a.jsonl", rows)  # labels are JSON numbers here
    for labels_list in (["0", "1", "2"], [0, 1, 2]):       # as written in YAML: strings or ints
        for path, fmt in ((csv_path, "csv"), (jsonl_path, "jsonl")):
            examples = read_examples(path, data_cfg(file_format=fmt, labels_list=labels_list), need_labels=True)
            assert examples.labels.tolist() == [1, 0, 2]


def test_labels_list_order_is_the_class_id(tmp_path):
    path = write_csv(tmp_path / "a.csv", ROWS)
    examples = read_examples(path, data_cfg(labels_list=["positive", "negative"]), need_labels=True)
    assert examples.labels.tolist() == [0, 1, 0]


def test_regression_labels_are_floats(tmp_path):
    rows = [{"text": "good", "label": "4.5"}, {"text": "bad", "label": "-1"}, {"text": "ok", "label": "2e-1"}]
    examples = read_examples(write_csv(tmp_path / "a.csv", rows), data_cfg(labels_list=["score"]), True)
    assert examples.labels.dtype == np.float32
    assert examples.labels.tolist() == pytest.approx([4.5, -1.0, 0.2])


def test_file_without_labels_reads_for_prediction(tmp_path):
    path = write_csv(tmp_path / "a.csv", [{"text": row["text"]} for row in ROWS])
    examples = read_examples(path, data_cfg(labels_list=LABELS), need_labels=False)
    assert examples.labels is None and len(examples.texts_a) == 3


def test_latin1_file_reads_with_data_encoding(tmp_path):
    rows = [{"text": "café très bon", "label": "positive"}, {"text": "naïve", "label": "negative"}]
    path = write_csv(tmp_path / "a.csv", rows, encoding="latin-1")
    examples = read_examples(path, data_cfg(encoding="latin-1", labels_list=LABELS), need_labels=True)
    assert examples.texts_a == ["café très bon", "naïve"]


def test_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path):
    path = write_csv(tmp_path / "a.csv", ROWS, encoding="utf-8-sig")
    assert open(path, "rb").read(3) == b"\xef\xbb\xbf"
    examples = read_examples(path, data_cfg(labels_list=LABELS), need_labels=True)
    assert examples.columns == ["text", "label"]
    assert examples.texts_a[0] == "good movie"


# -- files that used to lose rows or crash (issue 12) -------------------------------------------


def test_a_text_longer_than_the_csv_field_limit_reads_whole(tmp_path):
    long_text = "good " * 40_000  # 200,000 characters; the csv module stops at 131,072 by default
    rows = [{"text": long_text, "label": "positive"}, {"text": "bad", "label": "negative"}]
    examples = read_examples(write_csv(tmp_path / "a.csv", rows), data_cfg(labels_list=LABELS), True)
    assert examples.texts_a == [long_text, "bad"]


def swallowing_file(path, delimiter, quote_closed_at=None):
    """label, text rows; row 11 opens a quote, closed on row quote_closed_at or never."""
    lines = [f"label{delimiter}text"]
    for i in range(1, 101 if quote_closed_at is None else quote_closed_at + 1):
        text = f"row {i} was good"
        if i == 11:
            text = '"' + text
        if i == quote_closed_at:
            text += '"'
        lines.append(f"positive{delimiter}{text}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("name, fmt, quoting, delimiter",
                         [("a.tsv", "tsv", "csv", "\t"), ("a.csv", "csv", "auto", ",")])
def test_a_quote_never_closed_is_an_error_naming_its_line(tmp_path, name, fmt, quoting, delimiter):
    # before, 11 examples were read and the 11th held the text of the 89 rows below it; the error
    # names line 12, where the quote opened, not a line below it
    path = swallowing_file(tmp_path / name, delimiter)
    with pytest.raises(DataError, match=rf"{name}:12: a quoted field is not closed properly .*"
                                        rf"--data\.quoting none"):
        read_examples(path, data_cfg(file_format=fmt, quoting=quoting, labels_list=LABELS), need_labels=True)


def test_a_quote_that_swallows_ten_thousand_lines_is_an_error_naming_its_line(tmp_path):
    # closed at last by a stray quote, the field reads as one text of 10,010 rows
    path = swallowing_file(tmp_path / "a.tsv", "\t", quote_closed_at=10_020)
    with pytest.raises(DataError, match=r"a\.tsv:12: a quoted field runs over more than 10000"):
        read_examples(path, data_cfg(file_format="tsv", quoting="csv", labels_list=LABELS), need_labels=True)


def test_a_quoted_field_over_lines_reads_whole_and_its_row_is_named_by_its_first_line(tmp_path):
    rows = [{"text": "good\nvery\ngood", "label": "positive"},
            {"text": 'he said "bad" twice', "label": "negative"}]  # mid-field quotes are text
    path = write_csv(tmp_path / "a.tsv", rows, delimiter="\t")
    cfg = data_cfg(file_format="tsv", quoting="csv")
    examples = read_examples(path, {**cfg, "labels_list": LABELS}, need_labels=True)
    assert examples.texts_a == ["good\nvery\ngood", 'he said "bad" twice']
    rows[0]["label"] = "neutral"
    path = write_csv(tmp_path / "b.tsv", rows, delimiter="\t")
    with pytest.raises(DataError, match=r"b\.tsv:2: label 'neutral'"):
        read_examples(path, {**cfg, "labels_list": LABELS}, need_labels=True)


@pytest.mark.parametrize("name, fmt, quoting", [("a.tsv", "tsv", "csv"), ("a.csv", "csv", "auto")])
def test_text_after_a_closing_quote_is_an_error(tmp_path, name, fmt, quoting):
    # the csv module would read '"bad" plot' as 'bad plot', dropping the quotes
    delimiter = "\t" if fmt == "tsv" else ","
    (tmp_path / name).write_text(f'text{delimiter}label\ngood{delimiter}positive\n'
                                 f'"bad" plot{delimiter}negative\n')
    with pytest.raises(DataError, match=rf"{name}:3: a quoted field is not closed properly"):
        read_examples(str(tmp_path / name), data_cfg(file_format=fmt, quoting=quoting, labels_list=LABELS), True)


def test_an_opened_quote_is_reported_at_its_line_however_far_it_runs(tmp_path):
    # the quote opened on line 3 runs to line 6, where text follows its closing quote
    (tmp_path / "a.tsv").write_text('text\tlabel\ngood\tpositive\n"bad\tnegative\nok\tpositive\n'
                                    'fine\tpositive\nnice" plot\tpositive\n')
    with pytest.raises(DataError, match=r"a\.tsv:3: a quoted field is not closed properly"):
        read_examples(str(tmp_path / "a.tsv"), data_cfg(file_format="tsv", quoting="csv", labels_list=LABELS), True)


# -- quotes in tsv files are text by default (issue 14) -----------------------------------------


QUOTED_TEXTS = ['"bad" plot', '"unbalanced', 'he said "good"', '""', 'a "" pair', 'good"']


def test_tsv_reads_quotes_as_text_by_default(tmp_path):
    # GLUE's tsv files are unquoted: before, '"bad" plot' was an error and '"good"' read as 'good'
    lines = ["text\tlabel"] + [f"{text}\tpositive" for text in QUOTED_TEXTS]
    (tmp_path / "a.tsv").write_text("\n".join(lines) + "\n")
    examples = read_examples(str(tmp_path / "a.tsv"), data_cfg(file_format="tsv", labels_list=LABELS), True, keep_rows=True)
    assert examples.texts_a == QUOTED_TEXTS
    assert examples.rows[0] == {"text": '"bad" plot', "label": "positive"}
    # the file of a quote never closed, read as text: every row, the 11th with its quote
    path = swallowing_file(tmp_path / "b.tsv", "\t")
    examples = read_examples(path, data_cfg(file_format="tsv", labels_list=LABELS), need_labels=True)
    assert len(examples.texts_a) == 100 and examples.texts_a[10] == '"row 11 was good'


def test_quoting_none_reads_quotes_in_a_csv_as_text(tmp_path):
    lines = ["text,label"] + [f"{text},positive" for text in QUOTED_TEXTS]
    (tmp_path / "a.csv").write_text("\n".join(lines) + "\n")
    examples = read_examples(str(tmp_path / "a.csv"), data_cfg(quoting="none", labels_list=LABELS), True)
    assert examples.texts_a == QUOTED_TEXTS


def test_csv_files_keep_their_quoting_by_default(tmp_path):
    # a quoted field holds the delimiter, a newline and "" for a quote; auto and csv read it so
    (tmp_path / "a.csv").write_text('text,label\n"good, ""very""\ngood",positive\nbad,negative\n')
    for quoting in ("auto", "csv"):
        examples = read_examples(str(tmp_path / "a.csv"), data_cfg(quoting=quoting, labels_list=LABELS), True)
        assert examples.texts_a == ['good, "very"\ngood', "bad"]


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e39"])  # 1e39 is inf in float32
def test_regression_label_not_finite_is_an_error_naming_its_line(tmp_path, value):
    rows = [{"text": "good", "label": "4.5"}, {"text": "bad", "label": value}]
    path = write_csv(tmp_path / "a.csv", rows)
    with pytest.raises(DataError, match=rf"a\.csv:3: regression label '{value}' is not a finite"):
        read_examples(path, data_cfg(labels_list=["score"]), need_labels=True)


def test_regression_label_nan_in_jsonl_is_an_error(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "good", "label": NaN}\n')  # json.loads takes NaN
    with pytest.raises(DataError, match=r"a\.jsonl:1: regression label nan is not a finite"):
        read_examples(str(tmp_path / "a.jsonl"), data_cfg(file_format="jsonl", labels_list=["score"]), True)


def test_a_nul_byte_is_an_error_naming_its_line(tmp_path):
    (tmp_path / "a.csv").write_bytes(b"text,label\ngood,positive\nba\x00d,negative\n")
    with pytest.raises(DataError, match=r"a\.csv:3: a NUL byte"):
        read_examples(str(tmp_path / "a.csv"), data_cfg(labels_list=LABELS), need_labels=True)


def test_jsonl_text_may_hold_a_line_separator(tmp_path):
    # valid JSON may hold U+2028 unescaped (json.dumps with ensure_ascii=False writes it so)
    (tmp_path / "a.jsonl").write_text('{"text": "good\u2028movie", "label": "positive"}\n'
                                      '{"text": "bad", "label": "negative"}\n', encoding="utf-8")
    examples = read_examples(str(tmp_path / "a.jsonl"), data_cfg(file_format="jsonl", labels_list=LABELS), True)
    assert examples.texts_a == ["good\u2028movie", "bad"]


# -- token ids -----------------------------------------------------------------------------------


def test_encode_truncates_to_max_seq_len_without_padding(tmp_path):
    rows = [{"text": "good " * 30, "label": "positive"}, {"text": "bad", "label": "negative"}]
    examples = read_examples(write_csv(tmp_path / "a.csv", rows), data_cfg(labels_list=LABELS), True)
    encoded = encode(make_tokenizer(), examples, max_seq_len=10, chunk_size=1)
    assert encoded.lengths.tolist() == [10, 3]
    assert [len(encoded.tokens(i)) for i in range(2)] == [10, 3]
    assert encoded.ids.dtype == np.uint16 and encoded.offsets.tolist() == [0, 10, 13]  # a small vocabulary
    assert encoded.labels.tolist() == [1, 0]


def test_ids_take_the_narrowest_type_that_holds_the_vocabulary():
    tokenizer = make_tokenizer()
    assert id_dtype(tokenizer) == np.uint16
    tokenizer.add_tokens([f"word{i}" for i in range(2 ** 16 - len(tokenizer) + 1)])  # one id past uint16
    assert len(tokenizer) == 2 ** 16 + 1 and id_dtype(tokenizer) == np.int32


def test_the_backend_path_gives_what_the_tokenizer_call_gives(tmp_path):
    # single texts and pairs, truncated at both sides of the pair, and a model without token types
    texts = ["the movie was good " * (i % 4 + 1) for i in range(9)]
    seconds = ["bad " * (i % 3 * 4) or "fine" for i in range(9)]
    tokenizer = make_tokenizer()
    for pair in (None, seconds):
        ids, types = backend_encode(tokenizer, texts, pair, 12)
        expected = tokenizer(texts, pair, truncation=True, max_length=12)
        assert ids == expected["input_ids"] and types == expected["token_type_ids"]
    tokenizer.model_input_names = ["input_ids", "attention_mask"]  # as DistilBERT's
    assert backend_encode(tokenizer, texts, seconds, 12)[1] is None


# -- training batches ----------------------------------------------------------------------------


def random_lengths(n, seed=0):
    return np.random.default_rng(seed).integers(1, 64, size=n)


@pytest.mark.parametrize("n, batch_size, world_size", [
    (64, 8, 1), (61, 8, 1), (13, 8, 1), (5, 8, 1),
    (64, 8, 2), (63, 8, 2), (13, 8, 2),
    (60, 6, 3), (59, 6, 3), (15, 6, 3), (1004, 9, 3)])
def test_train_batches_cover_every_example_once_over_ranks(n, batch_size, world_size):
    lengths = random_lengths(n)
    per_rank = [train_batches(lengths, batch_size, seed=1, epoch=0, rank=r, world_size=world_size,
                              group_size=4)
                for r in range(world_size)]
    # every rank runs the same number of steps, or DDP would hang
    assert len({len(batches) for batches in per_rank}) == 1
    seen = np.concatenate([indices for batches in per_rank for indices, _ in batches])
    assert sorted(seen.tolist()) == list(range(n))
    # the global size every rank is told is the real size of that step's batch
    for step in range(len(per_rank[0])):
        sizes = [len(per_rank[r][step][0]) for r in range(world_size)]
        assert {per_rank[r][step][1] for r in range(world_size)} == {sum(sizes)}
        assert sum(sizes) <= batch_size and min(sizes) >= 1
    # only the last global batch of the epoch can be short (it is shuffled into the order)
    assert sum(size != batch_size for _, size in per_rank[0]) <= 1


def test_final_batch_smaller_than_the_world_is_dropped():
    # 17 = 2 x 8 + 1: one example cannot be shared by 3 ranks, so that step is left out
    per_rank = [train_batches(random_lengths(17), 8, seed=0, epoch=0, rank=r, world_size=3)
                for r in range(3)]
    assert [len(batches) for batches in per_rank] == [2, 2, 2]
    assert sum(len(indices) for batches in per_rank for indices, _ in batches) == 16


def test_same_seed_and_epoch_give_the_same_order():
    lengths = random_lengths(200)
    a = train_batches(lengths, 8, seed=3, epoch=2)
    b = train_batches(lengths, 8, seed=3, epoch=2)
    assert [indices.tolist() for indices, _ in a] == [indices.tolist() for indices, _ in b]


def test_another_epoch_or_seed_gives_another_order():
    lengths = random_lengths(200)
    first = [indices.tolist() for indices, _ in train_batches(lengths, 8, seed=3, epoch=0)]
    assert first != [indices.tolist() for indices, _ in train_batches(lengths, 8, seed=3, epoch=1)]
    assert first != [indices.tolist() for indices, _ in train_batches(lengths, 8, seed=4, epoch=0)]


def padded_tokens(lengths, batches):
    return sum(len(indices) * lengths[indices].max() for indices in batches)


def test_length_grouping_reduces_padding_against_a_random_order():
    lengths = random_lengths(2000)
    grouped = [indices for indices, _ in train_batches(lengths, 16, seed=0, epoch=0)]
    order = np.random.default_rng(0).permutation(len(lengths))
    shuffled = np.split(order, range(16, len(order), 16))
    real = lengths.sum()
    waste_grouped = padded_tokens(lengths, grouped) - real
    waste_random = padded_tokens(lengths, shuffled) - real
    assert waste_grouped < 0.25 * waste_random
    # ... and the batch order is still shuffled, not longest first
    maxima = [lengths[indices].max() for indices in grouped]
    assert maxima != sorted(maxima, reverse=True) and maxima != sorted(maxima)


def test_micro_batches_split_a_batch_for_accumulation():
    indices = np.arange(10, 18)
    micro = micro_batches(indices, 3)  # grad_accum_steps 3: three near-equal micro-batches
    assert [len(m) for m in micro] == [3, 3, 2]
    assert np.concatenate(micro).tolist() == indices.tolist()
    assert [len(m) for m in micro_batches(indices, 1)] == [8]
    # a short last batch with fewer examples than accumulation steps: no empty micro-batch
    assert [len(m) for m in micro_batches(np.arange(3), 8)] == [1, 1, 1]


# -- padding -------------------------------------------------------------------------------------


def test_collate_pads_to_a_multiple_when_asked_for_compiled_models():
    input_ids = [[2, 10, 3], [2, 10, 11, 12, 13, 3], [2, 3]]
    encoded = Encoded.from_lists(input_ids)
    batch = collate(encoded, np.array([0, 1, 2]), pad_token_id=0, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 8)
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 6, 2]  # padding is masked
    assert collate(encoded, np.array([0, 2]), 0)["input_ids"].shape == (2, 3)  # default: the longest


def test_collate_pads_only_to_the_batch_longest():
    input_ids = [[2, 10, 3], [2, 10, 11, 12, 13, 3], [2, 3], [2, 14, 15, 16, 3]]
    encoded = Encoded.from_lists(input_ids, [[0] * len(ids) for ids in input_ids], np.array([0, 1, 1, 0]))
    batch = collate(encoded, np.array([0, 2, 3]), pad_token_id=0)
    assert batch["input_ids"].shape == (3, 5)  # not 6 (example 1 is not in it), not max_seq_len
    assert batch["input_ids"].tolist() == [[2, 10, 3, 0, 0], [2, 3, 0, 0, 0], [2, 14, 15, 16, 3]]
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 2, 5]
    assert batch["token_type_ids"].shape == (3, 5)
    assert batch["labels"].tolist() == [0, 1, 0]
    assert batch["input_ids"].dtype == torch.int64


def test_collate_uses_the_tokenizer_pad_id_and_no_labels_for_unlabelled_data():
    input_ids = [[0, 5, 2], [0, 2]]
    encoded = Encoded.from_lists(input_ids)
    batch = collate(encoded, np.array([0, 1]), pad_token_id=1)  # RoBERTa pads with 1
    assert batch["input_ids"].tolist() == [[0, 5, 2], [0, 2, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert set(batch) == {"input_ids", "attention_mask"}


# -- evaluation batches --------------------------------------------------------------------------


@pytest.mark.parametrize("n, world_size", [(1, 1), (37, 1), (37, 2), (37, 3), (2, 3)])
def test_eval_batches_cover_every_example_exactly_once_over_ranks(n, world_size):
    lengths = random_lengths(n)
    seen = []
    for rank in range(world_size):
        batches = eval_batches(lengths, 5, rank, world_size)
        # no empty batch, even on a rank with no example: collate cannot pad zero sequences
        assert all(1 <= len(indices) <= 5 for indices in batches)
        flat = np.concatenate(batches) if batches else np.array([], dtype=np.int64)
        # longest first, so each batch holds similar lengths
        assert lengths[flat].tolist() == sorted(lengths[flat].tolist(), reverse=True)
        seen += flat.tolist()
    assert sorted(seen) == list(range(n))


# -- the flat layout (issue 17) ------------------------------------------------------------------


def list_collate(input_ids, token_types, labels, indices, pad_token_id, multiple=1):
    """The padding of before the flat layout, row by row from lists: the reference collate must equal."""
    rows = [input_ids[i] for i in indices]
    width = -(-max(len(r) for r in rows) // multiple) * multiple
    def pad(seqs, value):
        return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.int64)
    batch = {"input_ids": pad(rows, pad_token_id), "attention_mask": pad([[1] * len(r) for r in rows], 0)}
    if token_types is not None:
        batch["token_type_ids"] = pad([token_types[i] for i in indices], 0)
    if labels is not None:
        batch["labels"] = torch.from_numpy(labels[indices])
    return batch


@pytest.mark.parametrize("multiple, with_types", [(1, False), (1, True), (8, True)])
def test_flat_layout_gives_the_same_batches_as_lists(multiple, with_types):
    rng = np.random.default_rng(0)
    input_ids = [rng.integers(5, 30_000, size=rng.integers(1, 40)).tolist() for _ in range(300)]
    token_types = [rng.integers(0, 2, size=len(ids)).tolist() for ids in input_ids] if with_types else None
    # multi-label targets: a 2-D float array with NaN rows for unlabelled ones; labels stay opaque
    labels = rng.random((300, 3)).astype(np.float32)
    labels[::7] = np.nan
    encoded = Encoded.from_lists(input_ids, token_types, labels)
    assert encoded.ids.dtype == np.int32 and encoded.offsets.dtype == np.int64
    assert encoded.lengths.tolist() == [len(ids) for ids in input_ids]
    assert with_types == (encoded.token_type_ids is not None and encoded.token_type_ids.dtype == np.uint8)
    for indices, _ in train_batches(encoded.lengths, 16, seed=0, epoch=0):
        ours = collate(encoded, indices, pad_token_id=1, pad_to_multiple_of=multiple)
        reference = list_collate(input_ids, token_types, labels, indices, 1, multiple)
        assert ours.keys() == reference.keys()
        for key in ours:
            assert ours[key].dtype == reference[key].dtype and ours[key].shape == reference[key].shape
            assert torch.equal(ours[key].nan_to_num(-9), reference[key].nan_to_num(-9)), key


def test_encode_gives_each_text_the_tokenizer_own_ids_over_several_chunks(tmp_path):
    rows = [{"premise": "the movie " * (i % 5 + 1), "hypothesis": "good" if i % 2 else "very bad",
             "label": LABELS[i % 2]} for i in range(11)]
    examples = read_examples(write_csv(tmp_path / "a.csv", rows),
                             data_cfg(text_a_col="premise", text_b_col="hypothesis", labels_list=LABELS), True)
    tokenizer = make_tokenizer()
    encoded = encode(tokenizer, examples, max_seq_len=9, chunk_size=4)  # 3 chunks, the last short
    for i, row in enumerate(rows):
        expected = tokenizer(row["premise"], row["hypothesis"], truncation=True, max_length=9)
        assert encoded.tokens(i) == expected["input_ids"]
        start, end = encoded.offsets[i], encoded.offsets[i + 1]
        assert encoded.token_type_ids[start:end].tolist() == expected["token_type_ids"]
    assert encoded.labels.tolist() == [i % 2 for i in range(11)]


def test_subset_and_concat_keep_each_example_whole():
    a = Encoded.from_lists([[2, 5, 3], [2, 3], [2, 6, 7, 8, 3]], [[0, 0, 0], [0, 0], [0, 1, 1, 1, 1]],
                           np.array([1, 0, 1]))
    b = Encoded.from_lists([[2, 9, 3]], [[0, 0, 0]], np.array([-1]))
    both = Encoded.concat([a, b])
    assert [both.tokens(i) for i in range(4)] == [[2, 5, 3], [2, 3], [2, 6, 7, 8, 3], [2, 9, 3]]
    assert both.labels.tolist() == [1, 0, 1, -1] and both.token_type_ids[5:10].tolist() == [0, 1, 1, 1, 1]
    picked = both.subset([3, 0, 2])
    assert [picked.tokens(i) for i in range(3)] == [[2, 9, 3], [2, 5, 3], [2, 6, 7, 8, 3]]
    assert picked.labels.tolist() == [-1, 1, 1] and picked.lengths.tolist() == [3, 3, 5]
    assert picked.token_type_ids.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    # a part without token types is segment 0 throughout (encode stores none for single texts)
    mixed = Encoded.concat([a, Encoded.from_lists([[2, 3]], None, np.array([0]))])
    assert mixed.token_type_ids.tolist() == a.token_type_ids.tolist() + [0, 0]
    assert Encoded.concat([b.subset([0]), b]).token_type_ids.tolist() == [0] * 6


def test_single_texts_store_no_token_types_and_batch_as_with_zeros(tmp_path):
    examples = read_examples(write_csv(tmp_path / "a.csv", ROWS), data_cfg(labels_list=LABELS), True)
    tokenizer = make_tokenizer()
    encoded = encode(tokenizer, examples, max_seq_len=16)
    assert encoded.token_type_ids is None  # BERT's tokenizer gave zeros, BERT's default without them
    batch = collate(encoded, np.arange(3), tokenizer.pad_token_id)
    padded = tokenizer([r["text"] for r in ROWS], padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], padded["input_ids"]) and (padded["token_type_ids"] == 0).all()


def test_prediction_chunks_are_the_rows_of_the_file_in_order(tmp_path):
    rows = [{"id": str(i), "text": f"good movie {i}"} for i in range(23)]
    path = write_csv(tmp_path / "a.csv", rows)
    chunks = list(example_chunks(path, data_cfg(labels_list=LABELS), chunk_rows=5))
    assert [len(c.texts_a) for c in chunks] == [5, 5, 5, 5, 3]
    assert [row for c in chunks for row in c.rows] == rows
    assert all(c.columns == ["id", "text"] and c.labels is None for c in chunks)
    assert count_examples(path, data_cfg(labels_list=LABELS)) == 23


def test_a_bad_row_late_in_a_prediction_file_is_found_by_the_check_pass(tmp_path):
    rows = [{"text": "good"}] * 30 + [{"text": " "}] + [{"text": "bad"}] * 5
    path = write_csv(tmp_path / "a.csv", rows)
    with pytest.raises(DataError, match=r"a\.csv:32: empty text"):
        count_examples(path, data_cfg(labels_list=LABELS))


# -- data.max_rows: a quick run on the first rows of each file ---------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_max_rows_reads_the_first_rows_and_never_the_rest(tmp_path, fmt):
    rows = ROWS * 3 + [{"text": "past the first rows", "label": "no such label"}]
    path = write_csv(tmp_path / "a.csv", rows) if fmt == "csv" else write_jsonl(tmp_path / "a.jsonl", rows)
    cfg = data_cfg(file_format=fmt, labels_list=LABELS, max_rows=4)
    examples = read_examples(path, cfg, need_labels=True)
    assert examples.texts_a == [row["text"] for row in ROWS + ROWS[:1]] and examples.labels.tolist() == [1, 0, 1, 1]
    assert count_examples(path, cfg) == 4
    assert [len(chunk.texts_a) for chunk in example_chunks(path, cfg, 3)] == [3, 1]
    with pytest.raises(DataError, match="label 'no such label' is not in data.labels_list"):
        read_examples(path, data_cfg(file_format=fmt, labels_list=LABELS), need_labels=True)


def test_a_quick_run_says_records_and_caches_its_first_rows_and_a_resume_keeps_them(tmp_path, tiny_bert, capsys):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(100, seed=1))
    val = write_csv(tmp_path / "val.csv", sentiment_rows(30, seed=2))

    def run(name, max_rows, **more):
        capsys.readouterr()
        rc = trainer.main(base_args(tmp_path, tiny_bert, train, val, **{
            "trainer.epochs": 1, "data.max_rows": max_rows, "ckpt.model_state_save_dir": str(tmp_path / name),
            "data.predict_filepath": val, "data.predict_output": str(tmp_path / f"{name}.csv"), **more}))
        out, err = capsys.readouterr()
        return rc, out, err
    rc, out, _ = run("quick", 40)
    assert rc == 0 and "training: 40 examples (data.max_rows 40: the first 40 rows of each file), 1 epochs x 3 steps" in out
    assert f"prediction of {val} (data.max_rows 40: the first 40 rows of each file)" in out
    assert len((tmp_path / "quick.csv").read_text().splitlines()) == 1 + 30  # the val file has fewer rows
    record = json.loads((tmp_path / "runs" / os.path.basename(json.loads(out.splitlines()[-1])["run_dir"]) /
                         "run.json").read_text())
    assert record["max_rows"] == 40
    # the token cache keeps the first 40 rows apart from the first 60 (and from the whole file)
    rc, out, _ = run("more", 60)
    assert rc == 0 and "training: 60 examples (data.max_rows 60" in out
    # the rows a run trained on are part of what it is: a resume may not change them
    rc, _, err = run("quick", 60, **{"ckpt.resume": "auto"})
    assert rc == 2 and "data.max_rows 40 -> 60" in err

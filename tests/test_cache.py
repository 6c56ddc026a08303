"""The token cache (cache.py): keyed by what the ids follow from, mapped on a hit, rebuilt when stale
or torn, never left half written, and waited for by the ranks that do not build it."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import cache
import splits
from config import GOLDEN_CONFIG, load_config, read_yaml
from conftest import POSITIVE, save_tiny_encoder, sentiment_rows, write_csv
from data import DataError, encode, read_examples
from processes import Process

LABELS = ["negative", "positive"]
MAIN = Process(0, 0, 1, torch.device("cpu"), True, False)


def data_cfg(**overrides):
    """config.yaml's data section for a file of text / label columns."""
    return {**read_yaml(GOLDEN_CONFIG)["data"], "text_a_col": "text", "label_col": "label", **overrides}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The fast (Rust) tokenizer of a tiny saved encoder, as load_tokenizer gives it."""
    return AutoTokenizer.from_pretrained(save_tiny_encoder(tmp_path_factory.mktemp("tok")))


@pytest.fixture
def counted(monkeypatch):
    """The number of times the cache tokenized a file."""
    calls = []
    monkeypatch.setattr(cache, "encode", lambda *args, **kwargs: calls.append(1) or encode(*args, **kwargs))
    return calls


def load(tmp_path, tokenizer, path, max_seq_len=16, cfg=None, proc=MAIN, say=print):
    cfg = cfg or data_cfg()
    examples = read_examples(str(path), {**cfg, "labels_list": LABELS}, need_labels=True)
    return cache.cached_encode(tmp_path / "cache", tokenizer, examples, cfg, max_seq_len, proc, say)


def entries(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").iterdir())


def same_arrays(a, b):
    return all(np.array_equal(getattr(a, name), getattr(b, name)) for name in ("ids", "offsets", "labels")) \
        and (a.token_type_ids is None) == (b.token_type_ids is None)


def test_a_hit_maps_the_same_arrays_without_tokenizing(tmp_path, tokenizer, counted):
    path = write_csv(tmp_path / "train.csv", sentiment_rows(50))
    first = load(tmp_path, tokenizer, path)
    assert len(counted) == 1
    (key,) = entries(tmp_path)
    manifest = json.loads((tmp_path / "cache" / key / "manifest.json").read_text())
    assert manifest["rows"] == 50 and manifest["arrays"]["ids"]["dtype"] == "uint16"
    second = load(tmp_path, tokenizer, path)
    assert len(counted) == 1  # not tokenized again
    assert isinstance(second.ids, np.memmap) and isinstance(second.offsets, np.memmap)
    assert same_arrays(first, second)
    # ... and they are the ids tokenizing gives, with the labels read from the file
    fresh = encode(tokenizer, read_examples(path, data_cfg(labels_list=LABELS), True), 16)
    assert same_arrays(second, fresh) and second.labels.tolist() == fresh.labels.tolist()


def test_the_key_follows_what_changes_the_ids_and_labels_and_nothing_else(tmp_path, tokenizer):
    path = write_csv(tmp_path / "a.csv", [{"text": "good movie", "other": "bad", "label": "positive"}])
    def key(path=path, tok=tokenizer, n=16, labelled=True, **options):
        return cache.cache_key(path, tok, data_cfg(**options), n, labelled)[0]
    base = key()
    tokenizer("some text", truncation=True, max_length=5)  # a call sets the backend's truncation
    assert key() == base
    same = write_csv(tmp_path / "b.csv", [{"text": "good movie", "other": "bad", "label": "positive"}])
    assert key(path=same) == base  # the content counts, not the name
    unlabelled = key(labelled=False)  # a file read without labels: their options change nothing
    assert key(labelled=False, label_col="other", labels_list=["x", "y"], multi_label=True) == unlabelled
    changed = [key(n=8), key(text_a_col="other"), key(text_b_col="other"), key(encoding="latin-1"),
               key(quoting="none"), key(header=None), key(file_format="tsv"), key(long_texts="windows"),
               key(path=write_csv(tmp_path / "c.csv", [{"text": "good film", "other": "bad", "label": "positive"}])),
               unlabelled, key(label_col="other"), key(labels_list=["positive", "negative"]),
               key(multi_label=True), key(label_sep=";")]
    other = AutoTokenizer.from_pretrained(save_tiny_encoder(tmp_path / "other"))
    other.add_tokens(["wonderfully"])
    changed.append(key(tok=other))
    assert base not in changed and len(set(changed)) == len(changed)


def test_a_stale_cache_is_not_used_when_the_file_or_max_seq_len_changes(tmp_path, tokenizer, counted):
    path = tmp_path / "train.csv"
    write_csv(path, [{"text": "good movie " * 10, "label": "positive"}])
    assert load(tmp_path, tokenizer, path).lengths.tolist() == [16]
    assert load(tmp_path, tokenizer, path, max_seq_len=8).lengths.tolist() == [8]
    write_csv(path, [{"text": "bad", "label": "negative"}, {"text": "good", "label": "positive"}])
    assert load(tmp_path, tokenizer, path).lengths.tolist() == [3, 3]
    assert len(counted) == 3 and len(entries(tmp_path)) == 3


@pytest.mark.parametrize("damage", ["truncated ids", "no manifest", "manifest of other rows", "manifest missing a field"])
def test_a_torn_entry_is_detected_and_rebuilt(tmp_path, tokenizer, counted, damage):
    path = write_csv(tmp_path / "train.csv", sentiment_rows(40))
    load(tmp_path, tokenizer, path)
    good = encode(tokenizer, read_examples(path, data_cfg(labels_list=LABELS), True), 16)  # not a map of the file damaged below
    entry = tmp_path / "cache" / entries(tmp_path)[0]
    if damage == "truncated ids":
        data = (entry / "ids.npy").read_bytes()
        (entry / "ids.npy").write_bytes(data[:len(data) // 2])
    elif damage == "no manifest":
        (entry / "manifest.json").unlink()
    elif damage == "manifest missing a field":
        manifest = json.loads((entry / "manifest.json").read_text())
        del manifest["source"]
        (entry / "manifest.json").write_text(json.dumps(manifest))
    else:
        manifest = json.loads((entry / "manifest.json").read_text())
        (entry / "manifest.json").write_text(json.dumps({**manifest, "rows": 39}))
    notes = []
    rebuilt = load(tmp_path, tokenizer, path, say=notes.append)
    assert len(counted) == 2 and same_arrays(good, rebuilt)
    assert len(notes) == 1 and "incomplete or stale" in notes[0] and str(entry) in notes[0]
    assert entries(tmp_path) == [entry.name]
    load(tmp_path, tokenizer, path)
    assert len(counted) == 2  # the rebuilt entry is whole


def test_a_crash_while_writing_leaves_no_half_entry(tmp_path, tokenizer, counted, monkeypatch):
    path = write_csv(tmp_path / "train.csv", sentiment_rows(30))
    real_save, saved = np.save, []

    def crash_after_one(file, array):
        if saved:
            raise OSError(28, "No space left on device")
        saved.append(real_save(file, array))
    monkeypatch.setattr(np, "save", crash_after_one)
    with pytest.raises(DataError, match="cannot write the token cache .No space left on device"):
        load(tmp_path, tokenizer, path)
    assert saved and entries(tmp_path) == []  # neither the entry nor its temporary folder
    monkeypatch.setattr(np, "save", real_save)
    load(tmp_path, tokenizer, path)
    assert len(counted) == 2 and len(entries(tmp_path)) == 1


def test_a_torn_entry_holding_files_not_ours_is_set_aside_not_deleted(tmp_path, tokenizer):
    path = write_csv(tmp_path / "train.csv", sentiment_rows(20))
    load(tmp_path, tokenizer, path)
    entry = tmp_path / "cache" / entries(tmp_path)[0]
    (entry / "manifest.json").unlink()
    (entry / "my-notes.txt").write_text("keep me")
    load(tmp_path, tokenizer, path)
    kept = list((tmp_path / "cache").glob("*/my-notes.txt"))
    assert len(kept) == 1 and kept[0].read_text() == "keep me" and kept[0].parent != entry
    assert (entry / "manifest.json").is_file()


def test_a_waiting_rank_maps_the_entry_or_reports_the_builder_failure(tmp_path, tokenizer, monkeypatch):
    path = write_csv(tmp_path / "train.csv", sentiment_rows(20))
    waiter = Process(1, 1, 2, torch.device("cpu"), False, False)  # local rank 1: never builds
    monkeypatch.setattr(cache, "WAIT_SECONDS", 0.3)
    with pytest.raises(DataError, match="rank 1: waited .* hours for local rank 0 to build the token cache"):
        load(tmp_path, tokenizer, path, proc=waiter)
    built = load(tmp_path, tokenizer, path)
    assert same_arrays(load(tmp_path, tokenizer, path, proc=waiter), built)
    key = cache.cache_key(path, tokenizer, data_cfg(), 8, True)[0]
    (tmp_path / "cache" / f"{key}.failed").write_text("DataError: disk full\n")
    with pytest.raises(DataError, match=r"rank 1: local rank 0 failed to build the token cache .*\(DataError: disk full\)"):
        load(tmp_path, tokenizer, path, max_seq_len=8, proc=waiter)


def test_no_cache_dir_tokenizes_every_time(tmp_path, tokenizer, counted):
    path = write_csv(tmp_path / "train.csv", [{"text": w, "label": "positive"} for w in POSITIVE])
    examples = read_examples(path, data_cfg(labels_list=LABELS), True)
    for _ in range(2):
        cache.cached_encode(None, tokenizer, examples, data_cfg(), 16, MAIN)
    assert not (tmp_path / "cache").exists()
    assert cache.cache_folder({"data": {"cache_dir": "auto"}, "trainer": {"log_dir": "some/runs"}}).as_posix() \
        == "some/.token_cache"


def test_a_second_builder_of_the_same_entry_leaves_the_first_one_whole(tmp_path, tokenizer):
    """Two machines' local rank 0 on one shared cache folder both build an entry: the later
    rename finds the entry there, drops its own copy and never deletes the files being mapped."""
    path = write_csv(tmp_path / "train.csv", sentiment_rows(20))
    first = load(tmp_path, tokenizer, path)
    key, source = cache.cache_key(path, tokenizer, data_cfg(), 16, True)
    entry = tmp_path / "cache" / key
    inode = (entry / "ids.npy").stat().st_ino
    cache.write_entry(entry, key, source, encode(tokenizer, read_examples(path, data_cfg(labels_list=LABELS), True), 16), path)
    assert entries(tmp_path) == [key] and (entry / "ids.npy").stat().st_ino == inode
    assert np.array_equal(first.ids, cache.open_entry(entry, key, 20)[0].ids)


# ---------------------------------------------------------------------------------------------
# a hit is not read again


def run_cfg(tmp_path, train, **overrides):
    """A run's config training on `train` (text / label columns) with the cache in tmp_path/cache."""
    args = {"data.train_filepath": train, "data.val_filepath": "null", "data.text_a_col": "text",
            "data.label_col": "label", "data.labels_list": "[negative, positive]", "module.max_seq_len": "16",
            "data.cache_dir": str(tmp_path / "cache"), **overrides}
    return load_config([item for key, value in args.items() for item in (f"--{key}", str(value))])


@pytest.fixture
def reads(monkeypatch):
    """The files the run read and checked (splits.read_examples)."""
    calls = []
    monkeypatch.setattr(splits, "read_examples", lambda path, *args, **kwargs:
                        calls.append(path) or read_examples(path, *args, **kwargs))
    return calls


def run_split(cfg, tokenizer, path):
    """A labelled file's ids as a run gets them: read (or mapped from the cache), then tokenized through it."""
    return splits.tokenize(cfg, MAIN, tokenizer, path, splits.read_split(cfg, MAIN, tokenizer, path, True)).encoded


def test_a_second_run_maps_ids_and_labels_without_reading_the_file(tmp_path, tokenizer, reads):
    path = write_csv(tmp_path / "train.csv", sentiment_rows(30))
    first = run_split(run_cfg(tmp_path, path), tokenizer, path)
    assert reads == [path]
    second = run_split(run_cfg(tmp_path, path), tokenizer, path)
    assert reads == [path]  # hashed, not read
    assert isinstance(second.labels, np.memmap) and same_arrays(first, second)
    # another labels_list gives other labels from the same ids: read again, into a new entry
    swapped = run_split(run_cfg(tmp_path, path, **{"data.labels_list": "[positive, negative]"}), tokenizer, path)
    assert reads == [path, path] and len(entries(tmp_path)) == 2
    assert np.array_equal(swapped.ids, first.ids) and swapped.labels.tolist() == (1 - first.labels).tolist()


def test_a_mapped_window_split_keeps_a_label_per_window(tmp_path, tokenizer, reads):
    path = write_csv(tmp_path / "train.csv", [{"text": "good movie " * 12, "label": "positive"},
                                              {"text": "bad", "label": "negative"}])
    windows = {"data.long_texts": "windows", "data.window_stride": "2"}
    first = run_split(run_cfg(tmp_path, path, **windows), tokenizer, path)
    second = run_split(run_cfg(tmp_path, path, **windows), tokenizer, path)
    assert reads == [path] and len(first) > 2
    assert second.documents.tolist() == first.documents.tolist() and second.labels.tolist() == first.labels.tolist()
    assert second.labels.tolist() == [1] * (len(first) - 1) + [0]


def test_an_entry_not_found_by_every_rank_is_used_by_none(tmp_path, tokenizer, monkeypatch):
    """A rank that mapped the entry while another read and built would wait alone at the build's
    barrier: the ranks agree (MIN) and all read the file unless all found it."""
    path = write_csv(tmp_path / "train.csv", sentiment_rows(10))
    load(tmp_path, tokenizer, path)  # the entry this rank finds
    other_found = []

    def all_reduce(tensor, op, group):  # the other rank's answer joins this one's
        assert op == torch.distributed.ReduceOp.MIN and group == "gloo group"
        tensor.copy_(torch.minimum(tensor, torch.tensor([int(other_found[-1])], dtype=tensor.dtype)))
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    rank = Process(0, 0, 2, torch.device("cpu"), True, True, cpu_group="gloo group")
    def found():
        return cache.mapped(tmp_path / "cache", tokenizer, path, data_cfg(), 16, True, rank)
    other_found.append(True)
    assert found() is not None
    other_found.append(False)
    assert found() is None


def test_an_unreadable_file_is_left_for_reading_to_report(tmp_path, tokenizer):
    assert cache.mapped(tmp_path / "cache", tokenizer, str(tmp_path / "missing.csv"), data_cfg(), 16, True, MAIN) is None
    cfg = run_cfg(tmp_path, tmp_path / "missing.csv")
    with pytest.raises(DataError, match="missing.csv: file not found"):
        run_split(cfg, tokenizer, str(tmp_path / "missing.csv"))

"""Trust, third sweep: no link and no path of ours is followed onto the user's files, every file of
ours that is read is checked for its values, and what a killed run leaves is proved ours before it
is swept. Each test plants the hostile case (a link, an edited file, a folder named like ours) or
the state a kill leaves, and checks the one line that refuses it or the note that repairs it."""
import fcntl
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import cache
import checkpoint
import files
from config import GOLDEN_CONFIG, ConfigError, load_config, read_yaml
from conftest import save_tiny_encoder, sentiment_rows, write_csv
from data import DataError, encode, read_examples
from model import ModelError, build_model, checkpoint_settings, label_config, saved_thresholds
from processes import single_process

LABELS = ["negative", "positive"]
# one process alone: it builds and maps its own entries
MAIN = single_process()


# ---------------------------------------------------------------------------------------------
# the token cache


def data_cfg(**overrides):
    return {**read_yaml(GOLDEN_CONFIG)["data"], "text_a_col": "text", "label_col": "label", "labels_list": LABELS,
            **overrides}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(save_tiny_encoder(tmp_path_factory.mktemp("tok")))


def load(tmp_path, tokenizer, path, say=print):
    examples = read_examples(str(path), data_cfg(labels_list=LABELS), need_labels=True)
    return cache.cached_encode(tmp_path / "cache", tokenizer, examples, data_cfg(), 16, MAIN, say)


def hit(tmp_path, tokenizer, path):
    return cache.mapped(tmp_path / "cache", tokenizer, str(path), data_cfg(), 16, True, MAIN)


def entry_of(tmp_path, tokenizer, path):
    return tmp_path / "cache" / cache.cache_key(str(path), tokenizer, data_cfg(), 16, True)[0]


def test_an_entry_that_is_a_link_to_a_user_folder_is_refused_and_nothing_behind_it_is_touched(tmp_path, tokenizer):
    path = write_csv(tmp_path / "train.csv", sentiment_rows(30))
    load(tmp_path, tokenizer, path)
    entry = entry_of(tmp_path, tokenizer, path)
    user = tmp_path / "my-arrays"
    shutil.copytree(entry, user)
    (user / "manifest.json").unlink()  # a user folder holding arrays of the same names: no entry of ours
    before = {p.name: p.read_bytes() for p in user.iterdir()}
    shutil.rmtree(entry)
    entry.symlink_to(user, target_is_directory=True)
    assert hit(tmp_path, tokenizer, path) is None
    with pytest.raises(DataError, match=rf"^{entry} is a link, where the token cache keeps an entry; .*remove the link"):
        load(tmp_path, tokenizer, path)
    assert {p.name: p.read_bytes() for p in user.iterdir()} == before
    assert entry.is_symlink() and not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_an_entry_file_that_is_a_link_is_not_mapped_and_its_target_survives_the_rebuild(tmp_path, tokenizer):
    path = write_csv(tmp_path / "train.csv", sentiment_rows(30))
    good = load(tmp_path, tokenizer, path)
    entry = entry_of(tmp_path, tokenizer, path)
    user = tmp_path / "my-ids.npy"
    shutil.move(entry / "ids.npy", user)
    (entry / "ids.npy").symlink_to(user)
    assert hit(tmp_path, tokenizer, path) is None
    notes = []
    rebuilt = load(tmp_path, tokenizer, path, say=notes.append)
    assert len(notes) == 1 and "ids.npy is a link" in notes[0]
    assert np.array_equal(rebuilt.ids, good.ids) and not (entry / "ids.npy").is_symlink()
    assert np.array_equal(np.load(user), good.ids)  # the file behind the link is whole


def rewrite(entry, name, change):
    """Rewrite one array of an entry with the same dtype and shape (so the same size): only its values differ."""
    array = np.load(entry / f"{name}.npy").copy()
    change(array)
    np.save(entry / f"{name}.npy", array)


@pytest.mark.parametrize("damage, why", [
    ("label past the classes", "labels outside data.labels_list"),
    ("labels set to -1", "labels outside data.labels_list"),
    ("id past the vocabulary", "ids outside the tokenizer's"),
    ("offsets that go back", "offsets that go back"),
])
def test_an_entry_with_values_no_tokenizing_gives_is_rebuilt_with_a_note(tmp_path, tokenizer, damage, why):
    path = write_csv(tmp_path / "train.csv", sentiment_rows(160))
    good = load(tmp_path, tokenizer, path)
    good = {name: np.array(getattr(good, name)) for name in ("ids", "offsets", "labels")}
    entry = entry_of(tmp_path, tokenizer, path)
    if damage == "label past the classes":
        rewrite(entry, "labels", lambda a: a.__setitem__(7, 2))
    elif damage == "labels set to -1":
        rewrite(entry, "labels", lambda a: a.__setitem__(slice(0, 150), -1))
    elif damage == "id past the vocabulary":
        rewrite(entry, "ids", lambda a: a.__setitem__(5, len(tokenizer) + 3))
    else:
        rewrite(entry, "offsets", lambda a: a.__setitem__(slice(3, 5), a[3:5][::-1].copy()))
    assert hit(tmp_path, tokenizer, path) is None  # never mapped
    notes = []
    rebuilt = load(tmp_path, tokenizer, path, say=notes.append)
    assert len(notes) == 1 and f"token cache {entry} is incomplete or stale ({why}" in notes[0]
    assert all(np.array_equal(getattr(rebuilt, name), array) for name, array in good.items())
    assert hit(tmp_path, tokenizer, path) is not None  # the rebuilt entry is whole


@pytest.mark.parametrize("task", ["multi_label", "regression"])
def test_labels_of_another_task_are_out_of_range(task):
    offsets = np.array([0, 3, 6])
    labels = np.array([[0, 1], [1, 2]], np.float32) if task == "multi_label" else np.array([0.5, np.nan], np.float32)
    encoded = SimpleNamespace(ids=np.array([2, 5, 3] * 2, np.uint16), offsets=offsets, token_type_ids=None,
                              documents=None, labels=labels)
    source = {"max_seq_len": 16, "options": {"labels_list": ["a", "b"] if task == "multi_label" else ["score"],
                                            "multi_label": task == "multi_label"}}
    assert cache.out_of_range(encoded, source, (30, 2)).startswith("labels outside")
    labels[1] = 1 if task == "multi_label" else 0.25
    assert cache.out_of_range(encoded, source, (30, 2)) is None


def test_the_temporary_folder_of_a_killed_builder_is_swept_and_no_other(tmp_path, tokenizer):
    path = write_csv(tmp_path / "train.csv", sentiment_rows(30))
    (tmp_path / "cache").mkdir()
    # a builder killed after two arrays: its .building file is there, its lock went with the process
    dead = tmp_path / "cache" / ".tmp-0123456789abcdef-deadbeef"
    dead.mkdir()
    (dead / cache.BUILDING).write_text(f"{cache.BUILDING_TEXT} 12345\n")
    np.save(dead / "ids.npy", np.zeros(10**6, np.uint16))
    np.save(dead / "offsets.npy", np.zeros(10, np.int64))
    # a builder still writing holds its lock; a user's folder of that name holds no .building file
    alive = tmp_path / "cache" / ".tmp-fedcba9876543210-0badcafe"
    alive.mkdir()
    lock = open(alive / cache.BUILDING, "w", encoding="utf-8")
    fcntl.flock(lock, fcntl.LOCK_EX)
    lock.write(f"{cache.BUILDING_TEXT} 1\n")
    lock.flush()
    user = tmp_path / "cache" / ".tmp-mine"
    user.mkdir()
    (user / "ids.npy").write_text("mine")
    try:
        notes = []
        load(tmp_path, tokenizer, path, say=notes.append)
    finally:
        lock.close()
    assert notes == [f"note: removed {dead}, a token cache entry that an earlier run did not finish writing"]
    assert not dead.exists() and (alive / cache.BUILDING).exists()
    assert (user / "ids.npy").read_text() == "mine"
    assert not [p for p in entry_of(tmp_path, tokenizer, path).iterdir() if p.name == cache.BUILDING]


def test_a_write_that_fails_leaves_neither_entry_nor_building_file(tmp_path, tokenizer, monkeypatch):
    path = write_csv(tmp_path / "train.csv", sentiment_rows(30))
    monkeypatch.setattr(cache, "publish", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(DataError, match="cannot write the token cache"):
        load(tmp_path, tokenizer, path)
    assert list((tmp_path / "cache").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# the save folder: its lock, what is moved aside, what is pruned


def test_a_lock_that_is_a_link_or_not_ours_is_refused_and_the_file_untouched(tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    precious = tmp_path / "notes.txt"
    precious.write_text("my thesis\n")
    for plant in ("symlink", "hardlink", "other content"):
        lock = save / checkpoint.LOCK
        lock.unlink(missing_ok=True)
        if plant == "symlink":
            lock.symlink_to(precious)
        elif plant == "hardlink":
            os.link(precious, lock)
        else:
            lock.write_text("my lock of something else\n")
        with pytest.raises(files.OutputError, match=rf"^{lock} is not a lock file of this trainer"):
            files.FolderLock(save, "s1")
        assert precious.read_text() == "my thesis\n"
    assert lock.read_text() == "my lock of something else\n"
    lock.write_text("pid 1 on host, run old-session\n")  # an earlier run's: ours, taken over
    held = files.FolderLock(save, "s2")
    held.release()
    assert "run s2" in lock.read_text()


def our_checkpoint(save, step, session="s-old", **fields):
    """A checkpoint folder of ours, as write_checkpoint writes it (a small training state)."""
    def write_files(folder):
        torch.save({"step": torch.tensor(step)}, folder / "training_state.pt")
        (folder / "model.safetensors").write_bytes(b"weights")
    manifest = {"step": step, "epoch": 0, "batch_in_epoch": step, "best": None, "bad_validations": 0,
                "run_dir": str(save.parent / "runs" / "r"), "world_size": 1,
                "config": read_yaml(GOLDEN_CONFIG), "data": {"data.train_filepath": ["ab" * 32]}, **fields}
    return checkpoint.write_checkpoint(save, checkpoint.checkpoint_name("checkpoint", 1, step), session,
                                       write_files, manifest)


def test_a_user_folder_named_like_checkpoints_moved_aside_is_left_alone(tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    ours = our_checkpoint(save, 3)
    user = save / ".replaced-x"  # named like ours, holding a name that exists and one that does not
    (user / ours.name).mkdir(parents=True)
    (user / ours.name / "notes").write_text("mine")
    (user / "checkpoint-epoch9-step9").mkdir()
    forged = save / ".replaced-y"  # a mark naming another session is not ours either
    forged.mkdir()
    (forged / checkpoint.ASIDE_MARK).write_text(json.dumps({"written_by": checkpoint.WRITTEN_BY, "session": "z"}))
    (forged / "data").write_text("mine too")
    messages = checkpoint.recover(save, "checkpoint")
    assert messages == [f"left {name} alone: named like checkpoints moved aside, but without this trainer's "
                        f"mark ({checkpoint.ASIDE_MARK})" for name in (".replaced-x", ".replaced-y")]
    assert (user / ours.name / "notes").read_text() == "mine" and (user / "checkpoint-epoch9-step9").is_dir()
    assert (forged / "data").read_text() == "mine too" and not (save / "data").exists()
    assert not (save / "checkpoint-epoch9-step9").exists() and checkpoint.read_manifest(ours) is not None


def test_checkpoints_moved_aside_by_us_are_still_restored_and_a_taken_name_is_kept_not_deleted(tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    first, second = our_checkpoint(save, 3), our_checkpoint(save, 6)
    aside = checkpoint.move_aside(save, [first, second], "dead")  # then a kill: nothing written
    second.mkdir()  # the user made a folder of that name meanwhile
    messages = checkpoint.recover(save, "checkpoint")
    assert messages == ["restored the checkpoints that an interrupted run had moved aside (.replaced-dead); "
                        f"{second.name} stay there: those names are taken again"]
    assert checkpoint.read_manifest(first) is not None
    assert checkpoint.read_manifest(aside / second.name) is not None  # ours, kept, not deleted


def test_pruning_renames_first_and_a_half_pruned_checkpoint_is_finished_by_the_next_start(tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    paths = [our_checkpoint(save, step) for step in (2, 4, 6)]
    checkpoint.prune(save, "checkpoint", 2, [paths[-1]])
    assert sorted(p.name for p in save.iterdir() if p.name != ".lock") == [paths[1].name, paths[2].name]
    # the state a SIGKILL during pruning leaves: renamed, some files gone, checkpoint.json (deleted last) there
    half = save / f".pruning-{paths[1].name}-0a1b2c3d"
    os.rename(paths[1], half)
    (half / "model.safetensors").unlink()
    emptied = save / f".pruning-{paths[0].name}-99aa00ff"  # killed after its checkpoint.json went
    emptied.mkdir()
    user = save / f".pruning-{paths[0].name}-12345678"  # named so, but proving nothing
    user.mkdir()
    (user / "data").write_text("mine")
    messages = checkpoint.recover(save, "checkpoint")
    assert f"finished deleting {half.name}, a checkpoint an earlier run was pruning" in messages
    assert f"finished deleting {emptied.name}, a checkpoint an earlier run was pruning" in messages
    assert f"left {user.name} alone: named like a checkpoint being deleted, but not one of ours" in messages
    assert not half.exists() and not emptied.exists() and (user / "data").read_text() == "mine"
    # the name was freed at once: a run writing that step again is not refused as "not ours"
    assert our_checkpoint(save, 4, session="s-new") == paths[1]
    assert [step for step, _, _ in checkpoint.our_checkpoints(save, "checkpoint")] == [4, 6]


def edited(path, change):
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    change(manifest)
    (path / checkpoint.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m["config"]["data"].__setitem__("window_stride", "16"), "data.window_stride is '16'; expected int"),
    (lambda m: m["config"]["data"].__setitem__("window_pool", "median"), "data.window_pool is 'median'; choose one of"),
    (lambda m: m["config"]["module"].__setitem__("max_seq_len", -4), "module.max_seq_len is -4; it must be positive"),
    (lambda m: m.__setitem__("step", "5"), "step is '5'"),
    (lambda m: m.__setitem__("epoch", -1), "epoch is -1"),
    (lambda m: m.pop("world_size"), "no world_size"),
    (lambda m: m.__setitem__("world_size", 0), "world_size is 0"),
    (lambda m: m.__setitem__("files", ["model.safetensors"]), "files is ['model.safetensors']"),
    (lambda m: m.__setitem__("files", {"../../etc/passwd": 1}), "its list of files is not names and sizes"),
    (lambda m: m.__setitem__("best", {"value": float("nan"), "step": 1, "metrics": {}, "path": None}), "best is"),
    (lambda m: m.__setitem__("config", [1]), "config is [1]"),
])
def test_a_checkpoint_json_edited_or_damaged_is_refused_in_one_line(tmp_path, edit, fragment):
    save = tmp_path / "ckpt"
    save.mkdir()
    path = our_checkpoint(save, 3)
    assert checkpoint.load_checkpoint(path, ".pt")[1]["step"] == 3
    edited(path, edit)
    with pytest.raises(checkpoint.CheckpointError) as refused:
        checkpoint.load_checkpoint(path, ".pt")
    message = str(refused.value)
    assert message.startswith(f"{path / checkpoint.MANIFEST}: ") and fragment in message and "\n" not in message


# ---------------------------------------------------------------------------------------------
# a fine-tuned model folder: its thresholds, its config, its weights


@pytest.fixture(scope="module")
def multi_label_model(tmp_path_factory):
    """A tiny multi-label classifier saved as a checkpoint folder is (config.json, weights, tokenizer)."""
    encoder = save_tiny_encoder(tmp_path_factory.mktemp("enc"))
    folder = tmp_path_factory.mktemp("multi")
    model = AutoModelForSequenceClassification.from_pretrained(encoder, **label_config(["a", "b"], multi_label=True))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(encoder).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("content, fragment", [
    ('{"thresholds": {"a": NaN, "b": 0.4}}', "are not all probabilities between 0 and 1"),
    ('{"thresholds": {"a": 1.5, "b": 0.4}}', "are not all probabilities between 0 and 1"),
    ('{"thresholds": {"a": "high", "b": 0.4}}', "are not all probabilities between 0 and 1"),
    ('{"thresholds": {"a": 0.3}}', "not a threshold for every label ['a', 'b']"),
    ('[0.3, 0.4]', "not a threshold for every label"),
    ('{"thresholds": ', "unreadable"),
    (None, "unreadable"),  # a folder
])
def test_a_thresholds_file_that_is_not_one_probability_per_label_is_refused(tmp_path, content, fragment):
    file = tmp_path / "thresholds.json"
    if content is None:
        file.mkdir()
    else:
        file.write_text(content)
    with pytest.raises(ModelError) as refused:
        saved_thresholds(tmp_path, ["a", "b"])
    assert str(refused.value).startswith(f"{file}: ") and fragment in str(refused.value)
    assert "give --module.threshold" in str(refused.value)


def test_a_missing_thresholds_file_warns_once_that_0_5_is_used(multi_label_model, capsys):
    (multi_label_model / "thresholds.json").unlink(missing_ok=True)
    settings = checkpoint_settings(str(multi_label_model))
    assert "module.threshold" not in settings  # config.yaml's 0.5
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "thresholds.json is missing" in err and "0.5" in err
    (multi_label_model / "thresholds.json").write_text('{"thresholds": {"a": 0.25, "b": 0.75}}')
    assert checkpoint_settings(str(multi_label_model))["module.threshold"][0] == [0.25, 0.75]
    (multi_label_model / "thresholds.json").write_text("garbage")
    assert "module.threshold" not in checkpoint_settings(str(multi_label_model), thresholds=False)  # the user's


def test_an_edited_checkpoint_json_beside_a_model_is_refused_for_evaluation(multi_label_model):
    (multi_label_model / "thresholds.json").write_text('{"thresholds": {"a": 0.5, "b": 0.5}}')
    config = read_yaml(GOLDEN_CONFIG)
    config["data"].update(long_texts="windows", window_pool="median")
    (multi_label_model / checkpoint.MANIFEST).write_text(json.dumps({"written_by": checkpoint.WRITTEN_BY,
                                                                     "config": config}))
    try:
        with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint\.json: config: data\.window_pool is 'median'"):
            checkpoint_settings(str(multi_label_model))
    finally:
        (multi_label_model / checkpoint.MANIFEST).unlink()


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {Path(__file__).parent / 'PWNED'}",))


@pytest.mark.parametrize("planted", ["code-running pickle", "truncated"])
def test_a_pytorch_model_bin_that_is_not_data_is_refused_in_one_line(tmp_path, multi_label_model, planted):
    folder = tmp_path / "model"
    shutil.copytree(multi_label_model, folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    if planted == "code-running pickle":
        torch.save({"classifier.weight": RunsCode()}, folder / "pytorch_model.bin")
    else:
        torch.save(weights, folder / "pytorch_model.bin")
        data = (folder / "pytorch_model.bin").read_bytes()
        (folder / "pytorch_model.bin").write_bytes(data[:int(len(data) * 0.9)])
    shutil.copy(folder / "pytorch_model.bin", tmp_path / "state.pt")
    for model_path, where in ((str(folder), "model.model_path"), (str(tmp_path / "state.pt"), str(tmp_path / "state.pt"))):
        model_cfg = {"hf_model": str(multi_label_model), "model_path": model_path, "model_file": None}
        with pytest.raises(ModelError) as refused:
            build_model(model_cfg, ["a", "b"], say=lambda message: None, multi_label=True)
        message = str(refused.value)
        assert where in message and "\n" not in message and "weights_only" not in message
        assert ("could run code" if planted == "code-running pickle" else "truncated") in message
    assert not (Path(__file__).parent / "PWNED").exists()


# ---------------------------------------------------------------------------------------------
# settings


def test_early_stopping_without_a_validation_file_is_refused_like_threshold_tune():
    with pytest.raises(ConfigError, match="^trainer.early_stopping_patience 3 counts validations on "
                                          "data.val_filepath, which is null; set a validation file"):
        load_config(["--data.val_filepath", "null", "--trainer.early_stopping_patience", "3"])
    assert load_config(["--data.val_filepath", "null"])["trainer"]["early_stopping_patience"] == 0


@pytest.mark.parametrize("typed", ["|", ">", "*", "&", "!", "%", "@", "#", "||", "-", "a b"])
def test_a_string_key_takes_the_text_as_typed(typed):
    cfg = load_config(["--data.multi_label", "true", "--data.labels_list", "[a, b]", "--data.label_sep", typed,
                       "--ckpt.file_prefix", f"run{typed}"])
    assert cfg["data"]["label_sep"] == typed and cfg["ckpt"]["file_prefix"] == f"run{typed}"


def test_other_keys_still_read_yaml_and_a_quoted_string_is_still_decoded():
    cfg = load_config(["--data.labels_list", "[a, b]", "--data.cache_dir", "null", "--trainer.epochs", "3",
                       "--module.max_lr", "2e-5", "--data.encoding", "'latin-1'", "--data.header", "null"])
    assert (cfg["data"]["labels_list"], cfg["data"]["cache_dir"], cfg["trainer"]["epochs"]) == (["a", "b"], None, 3)
    assert (cfg["module"]["max_lr"], cfg["data"]["encoding"], cfg["data"]["header"]) == (2e-5, "latin-1", None)
    with pytest.raises(ConfigError, match="ckpt.file_prefix is ''"):
        load_config(["--ckpt.file_prefix", "''"])


def test_utf_16_on_a_file_without_a_byte_order_mark_is_one_line_naming_the_file(tmp_path):
    path = write_csv(tmp_path / "train.csv", sentiment_rows(5))
    with pytest.raises(DataError, match=rf"^{path}: cannot be read as utf-16 .*set data.encoding"):
        read_examples(path, data_cfg(encoding="utf-16", labels_list=LABELS), need_labels=True)
    good = write_csv(tmp_path / "le.csv", sentiment_rows(5), encoding="utf-16-le")  # no mark either
    assert len(read_examples(good, data_cfg(encoding="utf-16-le", labels_list=LABELS), need_labels=True).texts_a) == 5


def test_encode_gives_no_entry_check_a_reason_to_rebuild(tmp_path, tokenizer):
    """The checks hold for what tokenizing gives: pairs with token types, windows with documents."""
    rows = [{"text": "bad plot", "other": " ".join(["good movie"] * 30), "label": "positive"}] * 3
    path = write_csv(tmp_path / "pairs.csv", rows)
    cfg = data_cfg(text_b_col="other", long_texts="windows", window_stride=2)
    examples = read_examples(path, {**cfg, "labels_list": LABELS}, need_labels=True)
    encoded = encode(tokenizer, examples, 16, stride=2)
    source = cache.cache_key(path, tokenizer, cfg, 16, True)[1]
    assert encoded.documents is not None and len(encoded) > 3
    assert cache.out_of_range(encoded, source, cache.id_limits(tokenizer)) is None

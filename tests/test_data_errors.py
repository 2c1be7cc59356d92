"""Bad dataset files give one line (``main.py: error: ...``, exit 2) naming the file and the entry at fault, or the
behaviour named: CIRR test1 pairids repeated, triplets rows whose target is their source (warned, kept), MIT-States
folder names that are not UTF-8 (skipped), non-UTF-8 / malformed triplets.csv, CSS3D scene structures, CIRR and
Fashion IQ JSON files, --submission_dir that cannot receive the files."""
from __future__ import annotations

import copy
import csv
import importlib.util
import json
import os
import re
import shutil

import numpy as np
import pytest

import config
import datasets
from errors import UserInputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 24


def _test_module(name: str):
    """A sibling test module, loaded from its file for its data writers (test modules are not importable by name
    under --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location(f"_data_errors_{name}", os.path.join(ROOT, "tests", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def helpers():
    return {name: _test_module(name) for name in ("test_cirr", "test_css3d", "test_datasets")}


def one_error_line(err: str) -> str:
    """The single non-empty stderr line of a refused run (asserted single, without a traceback)."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("main.py: error: "), lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------------------------
# CIRR
def _edit_json(path: str, edit) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data = edit(data)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def test_cirr_test1_repeated_pairids_are_refused_at_load(helpers, tmp_path):
    root = helpers["test_cirr"].make_cirr(tmp_path / "cirr")
    test1 = os.path.join(root, "captions", "cap.rc2.test1.json")

    def repeat(entries):
        for e in entries:
            e["pairid"] = entries[0]["pairid"]
        return entries

    _edit_json(test1, repeat)
    with pytest.raises(UserInputError) as exc:
        datasets.CIRR(root, "test1", image_size=S)
    assert str(exc.value) == (f"{test1}: 1 pairid listed more than once (300; 3 entries); the CIRR server scores "
                              f"one prediction per pairid: list each pair once")
    val = os.path.join(root, "captions", "cap.rc2.val.json")
    _edit_json(val, repeat)  # a labelled split keys nothing by pairid: loaded
    assert len(datasets.CIRR(root, "val", image_size=S)) == 3


def _cirr_case(case: str):
    """(file under the dataset folder, edit of its parsed JSON or raw text, expected message part)."""
    cap, split = "captions/cap.rc2.val.json", "image_splits/split.rc2.val.json"

    def entry(i, **change):
        def edit(entries):
            entries[i].update(change)
            return entries
        return edit

    return {
        "deep": (cap, "[" * 200000 + "]" * 200000, "cap.rc2.val.json: not valid JSON (maximum recursion depth"),
        "img_set_list": (cap, entry(1, img_set=["a", "b"]),
                         "cap.rc2.val.json: entry 1 is malformed: 'img_set' must be an object holding 'members', "
                         "got list"),
        "split_numbers": (split, lambda d: {k: 5 for k in d},
                          "split.rc2.val.json: entry 0 ('dev-0-0-img0'): the value must be a relative image path "
                          "string, got number '5'"),
        "caption_object": (cap, lambda d: {"0": d[0]}, "cap.rc2.val.json: expected a JSON list, got object"),
        "split_list": (split, lambda d: list(d), "split.rc2.val.json: expected a JSON object, got list"),
        "null": (cap, "null", "cap.rc2.val.json: expected a JSON list, got null"),
        "entry_string": (cap, lambda d: ["pair"] + d, "entry 0 is malformed: it is a string, not an object"),
        "members_number": (cap, entry(2, img_set={"members": ["dev-0-0-img0", 7]}),
                           "entry 2 is malformed: 'img_set.members[1]' must be an image name string, got number"),
        "pairid_string": (cap, entry(0, pairid="abc"), "entry 0 is malformed: 'pairid' must be an integer, got "
                                                       "string 'abc'"),
        "target_missing": (cap, lambda d: [{k: v for k, v in e.items() if k != "target_hard"} for e in d],
                           "entry 0 is malformed: 'target_hard' is missing"),
        "caption_surrogate": (cap, '[{"pairid": 1, "reference": "dev-0-0-img0", "target_hard": "dev-1-1-img1", '
                                   '"caption": "caf\\udce9", "img_set": {"members": []}}]',
                              "entry 0 is malformed: 'caption' must be a string, got text with a lone surrogate"),
        "not_utf8": (cap, b'\xef\xbb\xbf[{"caption": "caf\xe9"}]',
                     "cap.rc2.val.json: not UTF-8 text (byte 0xe9 at offset 20)"),  # offset 20: after the BOM
    }[case]


@pytest.mark.parametrize("case", ["deep", "img_set_list", "split_numbers", "caption_object", "split_list", "null",
                                  "entry_string", "members_number", "pairid_string", "target_missing",
                                  "caption_surrogate", "not_utf8"])
def test_cirr_bad_files_are_one_line(helpers, tmp_path, case):
    root = helpers["test_cirr"].make_cirr(tmp_path / "cirr")
    name, edit, expect = _cirr_case(case)
    path = os.path.join(root, name)
    if callable(edit):
        _edit_json(path, edit)
    else:
        with open(path, "wb") as f:
            f.write(edit if isinstance(edit, bytes) else edit.encode("utf-8"))
    with pytest.raises(UserInputError) as exc:
        datasets.CIRR(root, "val", image_size=S)
    message = str(exc.value)
    assert expect in message and "\n" not in message and len(message) < 400, message


def test_cirr_deep_json_through_main_is_one_line(helpers, tmp_path, run_main, capsys):
    root = helpers["test_cirr"].make_cirr(tmp_path / "cirr")
    with open(os.path.join(root, "captions", "cap.rc2.train.json"), "w") as f:
        f.write("[" * 200000 + "]" * 200000)
    rc, _ = run_main(helpers["test_cirr"]._flags(root, tmp_path / "logs") + ["--num_iters", "1"])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "cap.rc2.train.json: not valid JSON" in line
    assert not os.path.exists(tmp_path / "logs")


# ------------------------------------------------------------------------------------------------------------------
# --submission_dir
@pytest.mark.parametrize("case", ["file", "below_file", "recall_file_is_a_folder"])
def test_submission_dir_that_cannot_receive_the_files_is_refused_before_the_run(helpers, tmp_path, run_main, capsys,
                                                                                case):
    import cirr_submission

    root = helpers["test_cirr"].make_cirr(tmp_path / "cirr")
    (tmp_path / "a_file").write_text("x")
    target, expect = {
        "file": (tmp_path / "a_file", "is a file, not a folder"),
        "below_file": (tmp_path / "a_file" / "sub", "cannot create the folder (Not a directory)"),
        "recall_file_is_a_folder": (tmp_path / "sub", f"{cirr_submission.RECALL_FILE} exists and is not a file"),
    }[case]
    if case == "recall_file_is_a_folder":
        os.makedirs(target / cirr_submission.RECALL_FILE)
    rc, out = run_main(helpers["test_cirr"]._flags(root, tmp_path / "logs")
                       + ["--num_iters", "1", "--select_on", "val", "--submission_dir", str(target)])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"--submission_dir {target}" in line and expect in line, line
    assert not os.path.exists(tmp_path / "logs") and "iteration" not in out  # nothing ran


def test_missing_submission_dir_is_created_by_the_checks(helpers, tmp_path):
    root = helpers["test_cirr"].make_cirr(tmp_path / "cirr")
    folder = tmp_path / "new" / "sub"
    args = config.get_args_parser().parse_args(["--dataset", "cirr", "--dataset_path", root, "--select_on", "val",
                                                "--submission_dir", str(folder)])
    config.resolve_defaults(args)
    assert os.path.isdir(folder) and os.listdir(folder) == []


# ------------------------------------------------------------------------------------------------------------------
# triplets.csv
def _rows(data: str) -> list[dict]:
    with open(os.path.join(data, "triplets.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _copy_triplets(data: str, dest) -> str:
    """A copy of the triplets file at ``dest`` whose image paths are absolute (the images stay in ``data``)."""
    os.makedirs(dest)
    rows = _rows(data)
    for r in rows:
        for c in ("source", "target"):
            r[c] = os.path.join(data, r[c])
    with open(os.path.join(dest, "triplets.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(dest)


def test_rows_whose_target_is_their_source_are_warned_once_and_kept(triplets_data, tmp_path, caplog):
    data = _copy_triplets(triplets_data, tmp_path / "d")
    path = os.path.join(data, "triplets.csv")
    rows = _rows(data)
    test_rows = [i for i, r in enumerate(rows) if r["split"] == "test"]
    for i in test_rows[2:5]:
        rows[i]["target"] = rows[i]["source"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    caplog.set_level("WARNING")
    splits = datasets.build_splits("triplets", data, image_size=S)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    first_line = test_rows[2] + 2  # the header is line 1
    assert warnings == [f"{path}: 3 rows have the target equal to the source (first at line {first_line}); they can "
                        f"never be hits and lower recall"]
    assert len(splits["test"]) == len(test_rows)  # kept
    task = splits["test"].test_task()
    q = test_rows.index(test_rows[2])
    assert task.query_targets["composition"][q] == task.gallery_labels["composition"][task.query_exclude[q]]


def test_non_utf8_triplets_file_is_one_line_with_the_offset(triplets_data, tmp_path, triplets_tools, capsys):
    data = _copy_triplets(triplets_data, tmp_path / "d")
    path = os.path.join(data, "triplets.csv")
    with open(path, "rb") as f:
        raw = f.read()
    offset = raw.index(b"\n") + 1 + raw[raw.index(b"\n") + 1:].index(b",") + 1  # first row's text
    with open(path, "wb") as f:
        f.write(raw[:offset] + b"\xe9" + raw[offset:])
    rc, _ = triplets_tools.run(triplets_tools.cli(data, tmp_path / "logs", "--num_iters", "1"))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and line == (f"main.py: error: {path}: not UTF-8 text (byte 0xe9 at offset {offset}); convert it "
                                f"to UTF-8")


@pytest.mark.parametrize("case", ["too_many_fields", "too_few_fields", "repeated_column", "blank_lines_only",
                                  "huge_field"])
def test_malformed_triplets_rows_are_one_line(triplets_data, tmp_path, case):
    rows = _rows(triplets_data)
    r = {c: os.path.join(triplets_data, rows[0][c]) if c in ("source", "target") else rows[0][c]
         for c in ("source", "text", "target", "split")}
    good = f"{r['source']},{r['text']},{r['target']},train\n"
    header = "source,text,target,split\n"
    text, expect = {
        "too_many_fields": (header + good + f"{r['source']},make it red, and bigger,{r['target']},train\n",
                            "line 3: 5 fields, the header has 4; quote a cell that holds a comma"),
        "too_few_fields": (header + good + f"{r['source']},{r['text']},{r['target']}\n",
                           "line 3: 3 fields, the header has 4"),
        "repeated_column": ("source,text,target,split,text\n" + good.rstrip("\n") + ",x\n",
                            "the header names text more than once"),
        "blank_lines_only": ("\n\n \n", "is empty"),
        "huge_field": (header + good + f"{r['source']},{'x' * 200000},{r['target']},train\n",
                       "line 3: not valid CSV (field larger than field limit"),
    }[case]
    os.makedirs(tmp_path / "d")
    path = os.path.join(tmp_path, "d", "triplets.csv")
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(UserInputError) as exc:
        datasets.read_triplets_csv(path)
    assert str(exc.value).startswith(path) and expect in str(exc.value) and "\n" not in str(exc.value), exc.value


def test_triplets_file_with_a_bom_and_crlf_reads_as_the_plain_file(triplets_data, tmp_path):
    plain = datasets.read_triplets_csv(os.path.join(triplets_data, "triplets.csv"))
    with open(os.path.join(triplets_data, "triplets.csv"), "rb") as f:
        raw = f.read().replace(b"\r\n", b"\n")
    os.makedirs(tmp_path / "d")
    path = os.path.join(tmp_path, "d", "triplets.csv")
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + raw.replace(b"\n", b"\r\n"))
    for f in os.listdir(triplets_data):
        if f != "triplets.csv":
            os.symlink(os.path.join(triplets_data, f), os.path.join(tmp_path, "d", f))
    got = datasets.read_triplets_csv(path)
    relocated = [{**r, "source": r["source"].replace(triplets_data, str(tmp_path / "d")),
                  "target": r["target"].replace(triplets_data, str(tmp_path / "d"))} for r in plain]
    assert got == relocated and len(got) > 0


# ------------------------------------------------------------------------------------------------------------------
# MIT-States
def test_mitstates_folder_name_that_is_not_utf8_is_skipped_with_a_warning(helpers, tmp_path, caplog):
    root = helpers["test_datasets"].make_mitstates(tmp_path / "mit")
    images = os.path.join(root, "images")
    bad = os.fsdecode(b"caf\xe9 apple")  # os.listdir returns the undecodable byte as the lone surrogate '\udce9'
    os.makedirs(os.path.join(images, bad))
    shutil.copy(os.path.join(images, "red apple", "a0.jpg"), os.path.join(images, bad, "c0.jpg"))
    caplog.set_level("WARNING")
    train = datasets.MITStates(root, "train", image_size=S)
    assert f"skipping MIT-States folder {os.path.join(images, bad)!r}: its name is not UTF-8" in caplog.text
    assert "\\udce9" in caplog.text  # the repr of the name
    texts = train.get_all_texts()
    assert all(t.encode("utf-8") for t in texts) and not any("caf" in t for t in texts)
    assert train.noun2adjs["apple"] == ["green", "red", "ripe"]
    for adj in ("red", "old"):  # a noun of two adjectives whose folder names are not UTF-8: never held out
        os.makedirs(os.path.join(images, os.fsdecode(adj.encode() + b" \xe9pple")))
    with pytest.raises(UserInputError, match="only 2 training nouns with two adjectives"):
        datasets.MITStates.held_out_nouns(images, 2, seed=0)


# ------------------------------------------------------------------------------------------------------------------
# CSS3D
def _css_case(case: str):
    """(split, edit of the parsed {train, test} dict, expected message after '<file>: ')."""
    def set_mod(split, m, value):
        def edit(d):
            d[split]["mods"][m] = value
        return edit

    def set_key(split, m, key, value):
        def edit(d):
            if value is None:
                del d[split]["mods"][m][key]
            else:
                d[split]["mods"][m][key] = value
        return edit

    def set_part(split, key, value):
        def edit(d):
            d[split][key] = value
        return edit

    def set_object(split, i, j, value):
        def edit(d):
            d[split]["objects_img"][i][j] = value
        return edit

    return {
        "from_str": ("train", set_key("train", 1, "from", "abc"),
                     "train mods[1]: 'from' must be a list of image indices, got str 'abc'"),
        "from_strings": ("train", set_key("train", 1, "from", ["0", "2"]),
                         "train mods[1]: 'from' must be a list of image indices, got list holding str '0'"),
        "no_to_str": ("test", set_key("test", 0, "to_str", None), "test mods[0]: lacks 'to_str'"),
        "mod_is_string": ("train", set_mod("train", 0, "make it blue"),
                          "train mods[0]: must be a dict with 'from', 'to' and 'to_str', got str 'make it blue'"),
        "labels_short": ("test", set_part("test", "labels", np.array([10, 11])),
                         "test labels: must hold one label per scene of objects_img (4), got 2 labels"),
        "objects_int": ("train", set_part("train", "objects_img", 5),
                        "train objects_img: must be a non-empty list of scenes, got int 5"),
        "mods_dict": ("train", set_part("train", "mods", {"from": [0]}),
                      "train mods: must be a non-empty list of mods, got dict"),
        "to_float": ("test", set_key("test", 1, "to", [0.5]),
                     "test mods[1]: 'to' must be a list of image indices, got list holding float 0.5"),
        "to_str_number": ("test", set_key("test", 1, "to_str", 7),
                          "test mods[1]: 'to_str' must be a string, got int 7"),
        "bad_colour": ("test", set_object("test", 1, 0, {"color": "pink", "shape": "circle", "size": "large",
                                                         "pos": np.array([0.5, 0.5])}),
                       "test objects_img[1][0]: color 'pink' is not one of gray, red"),
        "scene_is_int": ("test", set_part("test", "objects_img", [[], 3, [], []]),
                         "test objects_img[1]: must be a list of objects, got int 3"),
    }[case]


@pytest.mark.parametrize("case", ["from_str", "from_strings", "no_to_str", "mod_is_string", "labels_short",
                                  "objects_int", "mods_dict", "to_float", "to_str_number", "bad_colour",
                                  "scene_is_int"])
def test_css3d_scene_structure_is_checked_once_at_load(helpers, tmp_path, case):
    css = helpers["test_css3d"]
    split, edit, expect = _css_case(case)
    data = {"train": copy.deepcopy(css.TRAIN), "test": copy.deepcopy(css.TEST)}
    edit(data)
    os.makedirs(tmp_path / "css")
    scene_file = os.path.join(tmp_path, "css", datasets.CSS3D_FILE)
    css.save_py2_npy(scene_file, data)
    with pytest.raises(UserInputError) as exc:
        datasets.CSS3D(str(tmp_path / "css"), split, image_size=S)
    assert str(exc.value).startswith(f"{scene_file}: {expect}"), exc.value
    assert str(exc.value).endswith("; re-download the dataset or fix the file") and "\n" not in str(exc.value)


def test_css3d_training_mod_without_pairs_is_refused(helpers, tmp_path):
    css = helpers["test_css3d"]
    data = {"train": copy.deepcopy(css.TRAIN), "test": copy.deepcopy(css.TEST)}
    data["train"]["mods"].append({"from": [], "to": [], "to_str": "nothing"})
    os.makedirs(tmp_path / "css")
    css.save_py2_npy(os.path.join(tmp_path, "css", datasets.CSS3D_FILE), data)
    with pytest.raises(UserInputError, match=r"train mods\[2\] has no \(from, to\) pairs"):
        datasets.CSS3D(str(tmp_path / "css"), "train", image_size=S)
    assert len(datasets.CSS3D(str(tmp_path / "css"), "test", image_size=S).test_queries()) == 3


def test_css3d_bad_structure_through_main_is_one_line(helpers, tmp_path, run_main, capsys):
    css = helpers["test_css3d"]
    data = {"train": copy.deepcopy(css.TRAIN), "test": copy.deepcopy(css.TEST)}
    data["train"]["mods"][1]["from"] = "abc"
    os.makedirs(tmp_path / "css")
    css.save_py2_npy(os.path.join(tmp_path, "css", datasets.CSS3D_FILE), data)
    argv = ["--dataset", "css3d", "--dataset_path", str(tmp_path / "css"), "--image_size", "32", "--batch_size", "2",
            "--loader_num_workers", "0", "--log_dir", str(tmp_path / "logs"), "--device", "cpu", "--image_weights",
            "none", "--use_bert", "False", "--lstm_dim", "16", "--num_iters", "1", "--model", "tirg"]
    rc, _ = run_main(argv)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and re.search(r"train mods\[1\]: 'from' must be a list of image indices, got str 'abc'", line)


# ------------------------------------------------------------------------------------------------------------------
# Fashion IQ and Fashion200k
@pytest.mark.parametrize("case", ["one_caption", "captions_string", "caption_number", "entry_list", "null",
                                  "split_entry_number"])
def test_fashioniq_bad_entries_are_one_line(helpers, tmp_path, case):
    root = helpers["test_datasets"].make_fashioniq(tmp_path / "fiq")
    entry = {"candidate": "dA", "target": "dB", "captions": ["is red", "is long"]}
    name, content, expect = {
        "one_caption": ("captions/cap.dress.val.json", [{**entry, "captions": ["is red"]}],
                        "entry 0 is malformed: 'captions' must be a list of 2 strings, got a list of 1"),
        "captions_string": ("captions/cap.dress.val.json", [entry, {**entry, "captions": "is red"}],
                            "entry 1 is malformed: 'captions' must be a list of 2 strings, got string"),
        "caption_number": ("captions/cap.dress.val.json", [{**entry, "captions": ["is red", 3]}],
                           "entry 0 is malformed: 'captions[1]' must be a string, got number"),
        "entry_list": ("captions/cap.dress.val.json", [["dA", "dB"]], "entry 0 is malformed: it is a list"),
        "null": ("captions/cap.dress.val.json", None, "cap.dress.val.json: expected a JSON list, got null"),
        "split_entry_number": ("image_splits/split.dress.val.json", ["dA", 4],
                               "split.dress.val.json: entry 1 must be an image name string, got number"),
    }[case]
    with open(os.path.join(root, name), "w") as f:
        json.dump(content, f)
    with pytest.raises(UserInputError) as exc:
        datasets.FashionIQ(root, "val", image_size=S)
    assert expect in str(exc.value) and "\n" not in str(exc.value), exc.value


def test_fashion200k_label_file_with_a_bom_reads_its_first_path(helpers, tmp_path):
    root = helpers["test_datasets"].make_fashion200k(tmp_path / "f200k")
    label = os.path.join(root, "labels", "dress_train_detect_all.txt")
    with open(label, "rb") as f:
        raw = f.read()
    with open(label, "wb") as f:
        f.write(b"\xef\xbb\xbf" + raw.replace(b"\n", b"\r\n"))
    train = datasets.Fashion200k(root, "train", image_size=S)
    assert train.imgs[0]["file_path"] == "women/dresses/d0.jpg" and not train.bad_images
    train.load_image(0)
    assert not train.bad_images

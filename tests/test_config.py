"""Config parsing and validation, in-process."""
from __future__ import annotations

import pytest

from mpi_sfl import config
from mpi_sfl.errors import UserError


def test_defaults_are_valid_and_the_issue_knobs_exist():
    cfg = config.load()
    assert cfg.model.name == "cnn" and cfg.model.split == "u" and cfg.sfl.state == "file"
    assert cfg.data.dataset == "fashion-mnist" and cfg.sfl.aggregation == "centralized"
    for key in ("data.dataset", "data.dir", "data.path", "data.shape", "data.train_samples", "data.partition", "data.alpha",
                "model.name", "model.split", "model.freeze_encoder", "train.rounds", "train.batch_size",
                "train.lr", "train.momentum", "train.aggregate_every", "train.clients", "sfl.state",
                "sfl.aggregation", "run.seed", "run.out_dir", "run.scratch_dir", "run.device"):
        value = cfg.get_key(key)  # KeyError if a knob is missing
        text = config.to_toml({key.split(".")[0]: {key.split(".")[1]: value}}).splitlines()[1].split(" = ", 1)[1]
        assert config.load(overrides=[f"{key}={text}"]).get_key(key) == value  # --set takes it back


def test_set_overrides_and_types():
    cfg = config.load(overrides=["train.lr=0.1", "train.rounds=7", "model.split=label-sharing",
                                 "model.freeze_encoder=true", "train.momentum=0"])
    assert cfg.train.lr == 0.1 and cfg.train.rounds == 7 and cfg.model.split == "label-sharing"
    assert cfg.model.freeze_encoder is True and isinstance(cfg.train.momentum, float)


@pytest.mark.parametrize("override, words", [
    ("train.lrr=0.1", "unknown config key 'train.lrr'"),
    ("trian.lr=0.1", "unknown config key 'trian.lr'"),
    ("train.rounds=1.5", "train.rounds (--set) must be int"),
    ("train.rounds=0", "train.rounds must be > 0"),
    ("sfl.state=disk", "sfl.state = 'disk' is not one of file, memory, graph"),
    ("model.freeze_encoder=1", "must be bool"),
    ("train.momentum=1.0", "train.momentum must be < 1"),
    ("nodot=3", "must look like section.key"),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(UserError, match=None) as exc:
        config.load(overrides=[override])
    assert words in str(exc.value)


def test_file_round_trip(tmp_path):
    cfg = config.load(overrides=["train.lr=0.125", 'run.out_dir="a \\"quoted\\" dir"'])
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml(cfg))
    assert config.load(str(path)) == cfg


def test_unknown_section_in_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[trainer]\nlr = 0.1\n")
    with pytest.raises(UserError, match=r"unknown config section \[trainer\]"):
        config.load(str(path))
    with pytest.raises(UserError, match="not found"):
        config.load(str(tmp_path / "missing.toml"))


NOT_TOML = {  # name: (content, words)
    "binary": (bytes(range(256)) * 4, "is not a TOML file: it is not UTF-8 text (byte 0x80 at offset 128)"),
    "latin-1": ("[train]\n# r\u00e9glages\nlr = 0.1\n".encode("latin-1"), "is not a TOML file: it is not UTF-8 text"),
    "invalid": (b"[train\nlr = 0.1\n", "is not valid TOML"),
    "bad-value": (b"[train]\nrounds = 'three'\n", "train.rounds"),
}


@pytest.mark.parametrize("name", list(NOT_TOML))
def test_a_config_file_that_is_not_toml_is_one_line_naming_it(tmp_path, capsys, name):
    """config.load raises UserError naming the file (one line); the baseline's command line says it
    once with exit 2 (under mpiexec, train: test_errors.py::test_bad_config_file)."""
    from mpi_sfl import cli
    path = tmp_path / f"{name}.toml"
    content, words = NOT_TOML[name]
    path.write_bytes(content)
    with pytest.raises(UserError) as exc:
        config.load(str(path))
    assert str(path) in str(exc.value) and words in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(SystemExit) as end:
        cli.main(["baseline", str(path)])
    assert end.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mpi-sfl: error: ") and err.count("\n") == 1 and str(path) in err, err


def test_list_values_parse_write_and_read_back(tmp_path):
    cfg = config.load(overrides=["data.dataset=synthetic", "data.shape=[3, 32, 32]"])
    assert cfg.data.shape == [3, 32, 32] and type(cfg.data.shape) is list  # a list: JSON round trips compare equal
    assert config.load().data.shape == [1, 28, 28]
    text = config.to_toml(cfg)
    assert "shape = [3, 32, 32]" in text
    path = tmp_path / "c.toml"
    path.write_text(text)
    again = config.load(str(path))
    assert again == cfg and type(again.data.shape) is list
    assert config.load(overrides=["data.dataset=synthetic", "data.shape=[7]"]).data.shape == [7]


@pytest.mark.parametrize("override, words", [
    ("data.shape=3", "data.shape (--set) must be a list of integers like [1, 28, 28], got 3 (int)"),
    ("data.shape=[3, 2.5]", "must be a list of integers"),
    ("data.shape=[true]", "must be a list of integers"),
    ('data.shape=["a"]', "must be a list of integers"),
    ("data.shape=3,32,32", "must be a list of integers"),
    ("data.shape=[]", "data.shape must be one or more positive integers"),
    ("data.shape=[3, 0, 2]", "data.shape must be one or more positive integers"),
    ("data.shape=[-1]", "data.shape must be one or more positive integers"),
])
def test_bad_lists_are_refused(override, words):
    with pytest.raises(UserError) as exc:
        config.load(overrides=["data.dataset=synthetic", override])
    assert words in str(exc.value)


@pytest.mark.parametrize("overrides, words", [
    (["data.dataset=npz"], "data.dataset = 'npz' needs data.path"),
    (['data.path="x.npz"'], "data.path is only for data.dataset = 'npz' (here 'fashion-mnist')"),
    (["data.dataset=synthetic", 'data.path="x.npz"'], "data.path is only for data.dataset = 'npz' (here 'synthetic')"),
    (["data.dataset=npz", 'data.path="x.npz"', 'data.dir="/d"'], "data.dir is only for fashion-mnist"),
    (["data.dataset=synthetic", 'data.dir="/d"'], "data.dir is only for fashion-mnist"),
    (["data.shape=[3, 32, 32]"], "data.shape is the sample shape of the synthetic set only"),
    (["data.dataset=npz", 'data.path="x.npz"', "data.shape=[2]"], "npz data has its own shape (from the file)"),
    (["data.dataset=mnist"], "data.dataset = 'mnist' is not one of fashion-mnist, synthetic, npz"),
])
def test_data_keys_go_with_their_dataset(overrides, words):
    with pytest.raises(UserError) as exc:
        config.load(overrides=overrides)
    assert words in str(exc.value)


def test_npz_config_is_valid_without_the_file():
    """The file is checked at set-up on rank 0 (data.prepare), not by the config."""
    cfg = config.load(overrides=["data.dataset=npz", 'data.path="nowhere/mine.npz"'])
    assert cfg.data.path == "nowhere/mine.npz" and cfg.data.shape == [1, 28, 28]


def test_client_optimizer_and_wire_dtype_are_checked():
    """The many-clients and wire knobs: their choices only, and reset refused where nothing averages."""
    assert config.load(overrides=['train.client_optimizer="reset"']).train.client_optimizer == "reset"
    assert config.load(overrides=['sfl.wire_dtype="int8"']).sfl.wire_dtype == "int8"
    for override, words in (('train.client_optimizer="forget"', "train.client_optimizer"),
                            ('sfl.wire_dtype="float8"', "sfl.wire_dtype")):
        with pytest.raises(UserError) as exc:
            config.load(overrides=[override])
        assert words in str(exc.value)
    with pytest.raises(UserError, match="relays one model with its optimizer state"):
        config.load(overrides=['sfl.variant="sl"', 'train.client_optimizer="reset"'])


def test_the_configuration_reference_lists_every_key_with_its_default():
    """The configuration reference (the key table in docs/running.md) names exactly the keys config.py
    accepts, each with its default as TOML writes it, so the two cannot drift apart."""
    import re
    from pathlib import Path

    from mpi_sfl.config import _toml_value, defaults

    accepted = {f"{s}.{k}": _toml_value(v) for s, table in defaults().items() for k, v in table.items()}
    text = (Path(__file__).parent.parent / "docs" / "running.md").read_text()
    listed = dict(re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \| `([^`]*)` \|", text, re.M))
    assert sorted(accepted) == sorted(listed), (sorted(set(accepted) - set(listed)), sorted(set(listed) - set(accepted)))
    assert {k: listed[k] for k in accepted} == accepted

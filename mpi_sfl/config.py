"""The job's configuration: TOML defaults shipped with the package, a user file, `--set` overrides.

Validation is strict and happens before any training, on every rank, so that a typo ends the job
with one message instead of a hang or a late crash.
"""
from __future__ import annotations

import copy
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UserError

CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": ("fashion-mnist", "synthetic"),
    "data.partition": ("iid", "dirichlet", "shards"),
    "model.name": ("cnn", "lenet5", "mlp"),
    "model.split": ("u", "label-sharing"),
    "sfl.state": ("file", "memory", "graph"),
    "sfl.aggregation": ("centralized", "decentralized"),
    "run.device": ("auto", "cpu", "cuda"),
    "run.progress": ("auto", "bar", "lines", "none"),
    "run.wait": ("auto", "spin", "poll"),
}
POSITIVE = ("train.rounds", "train.batch_size", "train.lr", "sfl.servers", "data.shards_per_client")
NON_NEGATIVE = ("data.train_samples", "data.test_samples", "train.momentum",
                "train.aggregate_every", "train.clients", "run.threads", "run.seed")


class Config(dict):
    """Nested dict {section: {key: value}} with attribute access: cfg.train.lr."""

    def __getattr__(self, name: str) -> Any:
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return Config(value) if isinstance(value, dict) else value

    def get_key(self, dotted: str) -> Any:
        section, key = dotted.split(".", 1)
        return self[section][key]


def defaults() -> Config:
    text = resources.files("mpi_sfl").joinpath("default.toml").read_text()
    return Config(tomllib.loads(text))


def parse_value(text: str) -> Any:
    """A `--set` value as TOML (numbers, booleans, quoted strings); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the file at `path`, then `section.key=value` overrides; validated."""
    cfg = defaults()
    base = copy.deepcopy(cfg)
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {path!r} not found")
        try:
            user = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"config file {path!r} is not valid TOML: {exc}") from None
        for section, table in user.items():
            if section not in base:
                raise UserError(f"unknown config section [{section}] in {path} "
                                f"(known: {', '.join(base)})")
            if not isinstance(table, dict):
                raise UserError(f"{section} in {path} must be a [section] table")
            for key, value in table.items():
                _set(cfg, base, f"{section}.{key}", value, origin=path)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects section.key=value, got {item!r}")
        dotted, text = item.split("=", 1)
        _set(cfg, base, dotted.strip(), parse_value(text.strip()), origin="--set")
    validate(cfg)
    return cfg


def _set(cfg: Config, base: Config, dotted: str, value: Any, origin: str) -> None:
    if dotted.count(".") != 1:
        raise UserError(f"config key {dotted!r} ({origin}) must look like section.key")
    section, key = dotted.split(".")
    if section not in base or key not in base[section]:
        known = ", ".join(f"{section}.{k}" for k in base.get(section, {})) or ", ".join(base)
        raise UserError(f"unknown config key {dotted!r} ({origin}); known: {known}")
    default = base[section][key]
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise UserError(f"{dotted} ({origin}) must be {type(default).__name__}, "
                        f"got {value!r} ({type(value).__name__})")
    cfg[section][key] = value


def validate(cfg: Config) -> None:
    """Checks that need no knowledge of the data or the world size."""
    for dotted, choices in CHOICES.items():
        if cfg.get_key(dotted) not in choices:
            raise UserError(f"{dotted} = {cfg.get_key(dotted)!r} is not one of {', '.join(choices)}")
    for dotted in POSITIVE:
        if not cfg.get_key(dotted) > 0:
            raise UserError(f"{dotted} must be > 0, got {cfg.get_key(dotted)}")
    for dotted in NON_NEGATIVE:
        if cfg.get_key(dotted) < 0:
            raise UserError(f"{dotted} must be >= 0, got {cfg.get_key(dotted)}")
    if not cfg["train"]["momentum"] < 1:
        raise UserError(f"train.momentum must be < 1, got {cfg['train']['momentum']}")
    if cfg["data"]["partition"] == "dirichlet" and not cfg["data"]["alpha"] > 0:
        raise UserError(f"data.alpha must be > 0, got {cfg['data']['alpha']}")
    if cfg["data"]["dataset"] == "synthetic" and cfg["data"]["dir"]:
        raise UserError("data.dir is only for fashion-mnist; the synthetic set is generated")


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML that `load` reads back unchanged (flat sections, scalars)."""
    lines: list[str] = []
    for section, table in cfg.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, (int, float)):
                text = repr(value)
            else:
                text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
            lines.append(f"{key} = {text}")
        lines.append("")
    return "\n".join(lines)

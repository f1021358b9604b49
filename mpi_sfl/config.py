"""The job's configuration: TOML defaults shipped with the package, a user file, `--set` overrides.

Validation is strict and happens before any training, on every rank, so that a typo ends the job
with one message instead of a hang or a late crash. The result is a frozen, typed `Config`
(one dataclass per TOML section) read once; the roles ask it for derived flags (`cfg.u_shape`,
`cfg.centralized`, `cfg.grad_input`, ...) instead of comparing strings.
"""
from __future__ import annotations

import copy
import dataclasses
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UserError

CHOICES: dict[str, tuple[str, ...]] = {
    "data.dataset": ("fashion-mnist", "synthetic", "npz"),
    "data.partition": ("iid", "dirichlet", "shards"),
    "model.split": ("u", "label-sharing"),
    "sfl.variant": ("sync", "v1", "v2", "sl", "fl"),
    "sfl.state": ("file", "memory", "graph"),
    "sfl.aggregation": ("centralized", "decentralized"),
    "sfl.aggregator": ("mean", "median", "trimmed-mean", "krum"),
    "sfl.wire_dtype": ("float32", "float16", "bfloat16", "int8"),
    "sfl.batch_clients": ("auto", "rank", "step", "off"),
    "train.attack": ("sign-flip", "scale", "gaussian"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.client_optimizer": ("keep", "reset"),
    "run.device": ("auto", "cpu", "cuda"),
    "run.progress": ("auto", "bar", "lines", "none"),
    "run.wait": ("auto", "spin", "poll"),
}
POSITIVE = ("train.rounds", "train.batch_size", "train.lr", "data.shards_per_client")
NON_NEGATIVE = ("data.train_samples", "data.test_samples", "train.momentum", "sfl.servers",
                "train.clients_per_round",
                "train.aggregate_every", "train.clients", "run.threads", "run.seed",
                "run.checkpoint_every", "run.timeout_s", "run.progress_every_s", "train.attackers", "train.attack_strength",
                "sfl.trim", "sfl.byzantine_f", "sfl.krum_select", "sfl.gather_limit_mb", "sfl.noise_std",
                "sfl.clip_norm")


class Raw(dict):
    """The nested {section: {key: value}} dict that TOML parsing and validation work on."""

    def get_key(self, dotted: str) -> Any:
        section, key = dotted.split(".", 1)
        return self[section][key]


@dataclass(frozen=True)
class Data:
    dataset: str
    dir: str
    path: str
    shape: list[int]  # a list, not a tuple: checkpoints compare config dicts through JSON
    train_samples: int
    test_samples: int
    partition: str
    alpha: float
    shards_per_client: int


@dataclass(frozen=True)
class Model:
    name: str
    cut: list
    split: str
    freeze_encoder: bool


@dataclass(frozen=True)
class Train:
    rounds: int
    batch_size: int
    lr: float
    momentum: float
    aggregate_every: int
    clients: int
    clients_per_round: int
    client_optimizer: str
    on_nonfinite: str
    attackers: int
    attack: str
    attack_strength: float


@dataclass(frozen=True)
class Sfl:
    variant: str
    state: str
    aggregation: str
    aggregator: str
    trim: float
    byzantine_f: int
    krum_select: int
    gather_limit_mb: float
    noise_std: float
    clip_norm: float
    wire_dtype: str
    batch_clients: str
    servers: int


@dataclass(frozen=True)
class Run:
    seed: int
    out_dir: str
    scratch_dir: str
    device: str
    deterministic: bool
    threads: int
    wait: str
    progress: str
    progress_every_s: float
    tensorboard: bool
    checkpoint_every: int
    timeout_s: float


SECTIONS = {"data": Data, "model": Model, "train": Train, "sfl": Sfl, "run": Run}


@dataclass(frozen=True)
class Config:
    """The validated config: `cfg.train.lr`, `cfg.sfl.variant`, and the flags derived from it."""
    data: Data
    model: Model
    train: Train
    sfl: Sfl
    run: Run

    @classmethod
    def from_raw(cls, raw: dict) -> "Config":
        return cls(**{name: kind(**raw[name]) for name, kind in SECTIONS.items()})

    def replace(self, section: str, **values: Any) -> "Config":
        """A copy with some keys of one section changed (e.g. train.clients once it is resolved)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **values)})

    def get_key(self, dotted: str) -> Any:
        section, key = dotted.split(".", 1)
        return getattr(getattr(self, section), key)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- derived flags, so no role compares strings ------------------------------------------------
    @property
    def u_shape(self) -> bool:
        """Labels stay on the client: encoder and head on the client, the body on the server."""
        return self.model.split == "u"

    @property
    def grad_input(self) -> bool:
        """Whether dl/dh travels back to the client (its encoder trains)."""
        return not self.model.freeze_encoder

    @property
    def centralized(self) -> bool:
        return self.sfl.aggregation == "centralized"

    @property
    def split(self) -> bool:
        """Whether the model is cut at all (every variant but fl)."""
        return self.sfl.variant != "fl"

    @property
    def robust(self) -> bool:
        """Whether averaging gathers every logical client's vector (median, trimmed mean, Krum)
        instead of reducing their weighted sum."""
        return self.sfl.aggregator != "mean"

    @property
    def averages(self) -> bool:
        """Whether the variant averages client parts (all but sl, which relays one model)."""
        return self.sfl.variant != "sl"


def defaults() -> Raw:
    text = resources.files("mpi_sfl").joinpath("default.toml").read_text()
    return Raw(tomllib.loads(text))


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
            user = tomllib.loads(p.read_bytes().decode("utf-8"))
        except OSError as exc:
            raise UserError(f"cannot read config file {path!r} ({exc.strerror})") from None
        except UnicodeDecodeError as exc:  # a binary file, or text in another encoding
            raise UserError(f"config file {path!r} is not a TOML file: it is not UTF-8 text "
                            f"(byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
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
    return Config.from_raw(cfg)


def _set(cfg: Raw, base: Raw, dotted: str, value: Any, origin: str) -> None:
    if dotted.count(".") != 1:
        raise UserError(f"config key {dotted!r} ({origin}) must look like section.key")
    section, key = dotted.split(".")
    if section not in base or key not in base[section]:
        known = ", ".join(f"{section}.{k}" for k in base.get(section, {})) or ", ".join(base)
        raise UserError(f"unknown config key {dotted!r} ({origin}); known: {known}")
    default = base[section][key]
    if isinstance(default, list):  # lists of ints (data.shape); kept a list, as TOML gives it
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not ok:
            raise UserError(f"{dotted} ({origin}) must be a list of integers like {_toml_value(default)}, "
                            f"got {value!r} ({type(value).__name__})")
        cfg[section][key] = list(value)
        return
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


def validate(cfg: Raw) -> None:
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
    from .zoo import MODELS
    name = cfg["model"]["name"]
    if name not in MODELS and (":" not in name or not all(name.split(":", 1))):
        raise UserError(f"model.name = {name!r} is neither a built-in model ({', '.join(MODELS)}) nor a "
                        "function of yours as \"package.module:function\"")
    if not cfg["train"]["momentum"] < 1:
        raise UserError(f"train.momentum must be < 1, got {cfg['train']['momentum']}")
    if cfg["data"]["partition"] == "dirichlet" and not cfg["data"]["alpha"] > 0:
        raise UserError(f"data.alpha must be > 0, got {cfg['data']['alpha']}")
    _check_variant(cfg["sfl"]["variant"], cfg["sfl"]["servers"], cfg["train"])
    _check_aggregator(cfg["sfl"], cfg["train"], cfg["sfl"]["variant"])
    _check_data(cfg["data"], defaults()["data"])


def _check_aggregator(sfl: dict, train: dict, variant: str) -> None:
    """Settings a robust aggregator or an attack cannot work with (the counts that depend on the
    number of logical clients are checked with the layout: aggregation.check_robust)."""
    if not sfl["trim"] < 0.5:
        raise UserError(f"sfl.trim = {sfl['trim']} cuts everything: it is the fraction cut at each end, "
                        "so it must be < 0.5")
    if variant == "fl" and (sfl["noise_std"] or sfl["clip_norm"]):
        raise UserError("sfl.noise_std and sfl.clip_norm act on the activations at the cut; sfl.variant = 'fl' "
                        "has no cut: set them to 0")
    if variant == "sl" and (sfl["aggregator"] != "mean" or train["attackers"]):
        raise UserError("sfl.variant = 'sl' relays one model and averages nothing: sfl.aggregator and "
                        "train.attackers are for the variants that average")


def _check_data(d: dict, default: dict) -> None:
    """Which data keys go with which data set (files are checked at set-up, not here)."""
    dataset = d["dataset"]
    if dataset != "fashion-mnist" and d["dir"]:
        raise UserError(f"data.dir is only for fashion-mnist (data.dataset = {dataset!r}): remove it"
                        + ("; the npz file is data.path" if dataset == "npz" else "; the synthetic set is generated"))
    if dataset == "npz" and not d["path"]:
        raise UserError("data.dataset = 'npz' needs data.path, the .npz file with x_train, y_train, x_test, y_test")
    if dataset != "npz" and d["path"]:
        raise UserError(f"data.path is only for data.dataset = 'npz' (here {dataset!r}): remove it, "
                        "or set data.dataset = 'npz'")
    shape = d["shape"]
    if not shape or any(n <= 0 for n in shape):
        raise UserError(f"data.shape must be one or more positive integers like [1, 28, 28], got {shape}")
    if dataset != "synthetic" and shape != default["shape"]:
        raise UserError(f"data.shape is the sample shape of the synthetic set only; {dataset} data has its own "
                        f"shape ({'1 x 28 x 28' if dataset == 'fashion-mnist' else 'from the file'}): remove it")


def _check_variant(variant: str, servers: int, train: dict) -> None:
    """Combinations that make no sense, refused with what to change."""
    if variant == "fl" and servers != 0:
        raise UserError(f"sfl.variant = 'fl' trains the whole model on the clients and has no split "
                        f"server: set sfl.servers = 0 (and launch {servers} rank(s) fewer)")
    if variant != "fl" and servers == 0:
        raise UserError(f"sfl.variant = {variant!r} needs a split server: sfl.servers = 0 is only for "
                        "sfl.variant = 'fl'")
    if variant in ("v2", "sl") and servers > 1:
        raise UserError(f"sfl.variant = {variant!r} updates one server part after every client batch, "
                        "which replicas cannot share: set sfl.servers = 1")
    if variant == "sl" and train["clients_per_round"]:
        raise UserError("train.clients_per_round samples clients for the variants that average; "
                        "sfl.variant = 'sl' relays one model through every client: set it to 0")
    if variant == "sl" and train["client_optimizer"] != "keep":
        raise UserError("train.client_optimizer = 'reset' is for the variants that average; sfl.variant = 'sl' "
                        "relays one model with its optimizer state: set it to 'keep'")
    if train["clients"] and train["clients_per_round"] > train["clients"]:
        raise UserError(f"train.clients_per_round = {train['clients_per_round']} exceeds "
                        f"train.clients = {train['clients']}")


def to_toml(cfg: "Config | dict") -> str:
    """The resolved config as TOML that `load` reads back unchanged (flat sections, scalars, lists)."""
    lines: list[str] = []
    for section, table in (cfg.as_dict() if isinstance(cfg, Config) else cfg).items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

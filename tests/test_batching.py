"""Cross-client batching on the split server (sfl.batch_clients, docs/design.md §3.12): for a
server part without running buffers (no BatchNorm; dropout draws each client's masks from its own
seed), sync's step over several
clients' batches run in groups of batches, each as one batch, is the same update as one batch at a
time, to float32 round-off, and so lands on the single-process baseline; the split server then runs
one forward per group ("rank": a client rank's logical clients, "step": all of them). "Round-off" is
measured (conftest.roundoff_bound), not a fixed number."""
from __future__ import annotations

import pytest

from conftest import TINY, baseline, close, load_model, metrics, ok, roundoff_bound, run_jobs, sets

pytestmark = pytest.mark.mpi  # every test here launches jobs (conftest: the quick tier)

COMMON = TINY + ["train.clients=5", "train.aggregate_every=1", "train.momentum=0.9", "train.batch_size=8"]
SPLITS = {"u": ['model.split="u"'], "u-frozen": ['model.split="u"', "model.freeze_encoder=true"],
          "label-sharing": ['model.split="label-sharing"']}
STEPS = 240 // 5 // 8  # each client's shard in batches of 8: 6 steps a round, 5 batches each


MODES = ("off", "rank", "step")
TWO = COMMON + ['model.name="mlp"']
DROPOUT = TINY + ["train.clients=3", "train.aggregate_every=1", 'model.name="cnn"', "train.rounds=1", 'sfl.batch_clients="step"']


def split_common(split: str) -> list[str]:
    return COMMON + ['model.name="lenet5"' if split == "u-frozen" else 'model.name="mlp"'] + SPLITS[split]


@pytest.fixture(scope="module")
def sfl(tmp_path_factory):
    """Every SFL job of this module (file state), those with the same -n in one launch (conftest.run_jobs)."""
    jobs = {f"{split}/{mode}": (4, split_common(split) + [f'sfl.batch_clients="{mode}"'])
            for split in SPLITS for mode in MODES}
    jobs |= {"two": (5, TWO + ['sfl.batch_clients="step"', "sfl.servers=2"]), "cnn": (4, DROPOUT)}
    return run_jobs(tmp_path_factory, {k: (r, v + ['sfl.state="file"']) for k, (r, v) in jobs.items()})


def train(tmp_path, name: str, key: str, sfl) -> tuple[dict, list[dict]]:
    """Job `key`'s model and metrics rows (its outputs copied to tmp_path/name)."""
    out = sfl.into(key, tmp_path / name)
    return load_model(out), metrics(out)


@pytest.mark.parametrize("split", list(SPLITS))
def test_batched_step_is_the_unbatched_step(split, tmp_path, sfl):
    """5 logical clients on 2 client ranks (3 + 2), one split server."""
    common = split_common(split)
    runs = {mode: train(tmp_path, mode, f"{split}/{mode}", sfl) for mode in MODES}
    ok(baseline(*sets(common + [f'run.out_dir="{tmp_path / "base"}"'])))
    ref = load_model(tmp_path / "base")
    passes = {mode: [r["server_passes"] for r in rows] for mode, (_, rows) in runs.items()}
    assert passes == {"off": [STEPS * 5] * 2, "rank": [STEPS * 2] * 2, "step": [STEPS] * 2}
    bound = roundoff_bound(tmp_path, ref, None, common, f"batching {split}: nudged baseline")
    for mode in ("rank", "step"):
        close(runs[mode][0], runs["off"][0], bound, f"batching {split}: {mode} vs off")
    for mode, (model, _) in runs.items():
        close(model, ref, bound, f"batching {split}: {mode} vs baseline")


def test_two_split_servers_batch_their_own_clients(tmp_path, sfl):
    """With 2 split servers, each batches the step's clients of its own client rank."""
    common = TWO
    model, rows = train(tmp_path, "two", "two", sfl)
    ok(baseline(*sets(common + [f'run.out_dir="{tmp_path / "base"}"'])))
    assert [r["server_passes"] for r in rows] == [STEPS * 2] * 2
    ref = load_model(tmp_path / "base")
    close(model, ref, roundoff_bound(tmp_path, ref, None, common, "batching 2 servers: nudged baseline"),
          "batching 2 servers: step vs baseline")


def test_a_dropout_body_is_batched_with_each_clients_masks(tmp_path, sfl):
    """cnn's server part has dropout: batched, each client's rows draw the masks of its own seed
    (models.ChunkSeeds), so the step's one pass lands on the baseline, which draws them per client
    batch; a mask shared by the group would not (tests/test_state.py, the control)."""
    model, rows = train(tmp_path, "cnn", "cnn", sfl)
    assert [r["server_passes"] for r in rows] == [240 // 3 // 16]  # one pass a step ("step")
    common = [s for s in DROPOUT if not s.startswith("sfl.")]
    ok(baseline(*sets(common + [f'run.out_dir="{tmp_path / "base"}"'])))
    ref = load_model(tmp_path / "base")
    close(model, ref, roundoff_bound(tmp_path, ref, None, common, "batching cnn: nudged baseline"),
          "batching cnn (dropout): step vs baseline")

"""Cross-client batching on the split server (sfl.batch_clients, docs/design.md §3.12): for a
server part that treats each sample alone (no dropout, no BatchNorm), sync's step over several
clients' batches run in groups of batches, each as one batch, is the same update as one batch at a
time, to float32 round-off, and so lands on the single-process baseline; the split server then runs
one forward per group ("rank": a client rank's logical clients, "step": all of them). "Round-off" is
measured (conftest.roundoff_bound), not a fixed number."""
from __future__ import annotations

import pytest

from conftest import TINY, baseline, close, load_model, metrics, mpirun, ok, roundoff_bound, sets
COMMON = TINY + ["train.clients=5", "train.aggregate_every=1", "train.momentum=0.9", "train.batch_size=8"]
SPLITS = {"u": ['model.split="u"'], "u-frozen": ['model.split="u"', "model.freeze_encoder=true"],
          "label-sharing": ['model.split="label-sharing"']}
STEPS = 240 // 5 // 8  # each client's shard in batches of 8: 6 steps a round, 5 batches each


def train(tmp_path, name: str, ranks: int, settings: list[str]) -> tuple[dict, list[dict]]:
    out = tmp_path / name
    ok(mpirun(ranks, "train", *sets(settings + ['sfl.state="file"', f'run.out_dir="{out}"'])))
    return load_model(out), metrics(out)


@pytest.mark.parametrize("split", list(SPLITS))
def test_batched_step_is_the_unbatched_step(split, tmp_path):
    """5 logical clients on 2 client ranks (3 + 2), one split server."""
    common = COMMON + ['model.name="lenet5"' if split == "u-frozen" else 'model.name="mlp"'] + SPLITS[split]
    runs = {mode: train(tmp_path, mode, 4, common + [f'sfl.batch_clients="{mode}"']) for mode in ("off", "rank", "step")}
    ok(baseline(*sets(common + [f'run.out_dir="{tmp_path / "base"}"'])))
    ref = load_model(tmp_path / "base")
    passes = {mode: [r["server_passes"] for r in rows] for mode, (_, rows) in runs.items()}
    assert passes == {"off": [STEPS * 5] * 2, "rank": [STEPS * 2] * 2, "step": [STEPS] * 2}
    bound = roundoff_bound(tmp_path, ref, None, common, f"batching {split}: nudged baseline")
    for mode in ("rank", "step"):
        close(runs[mode][0], runs["off"][0], bound, f"batching {split}: {mode} vs off")
    for mode, (model, _) in runs.items():
        close(model, ref, bound, f"batching {split}: {mode} vs baseline")


def test_two_split_servers_batch_their_own_clients(tmp_path):
    """With 2 split servers, each batches the step's clients of its own client rank."""
    common = COMMON + ['model.name="mlp"']
    model, rows = train(tmp_path, "two", 5, common + ['sfl.batch_clients="step"', "sfl.servers=2"])
    ok(baseline(*sets(common + [f'run.out_dir="{tmp_path / "base"}"'])))
    assert [r["server_passes"] for r in rows] == [STEPS * 2] * 2
    ref = load_model(tmp_path / "base")
    close(model, ref, roundoff_bound(tmp_path, ref, None, common, "batching 2 servers: nudged baseline"),
          "batching 2 servers: step vs baseline")


def test_a_dropout_body_is_not_batched(tmp_path):
    """cnn's server part has dropout, whose masks are drawn per client batch: one pass a batch."""
    _, rows = train(tmp_path, "cnn", 4, TINY + ["train.clients=3", 'model.name="cnn"', "train.rounds=1",
                                              'sfl.batch_clients="step"'])
    assert [r["server_passes"] for r in rows] == [3 * (240 // 3 // 16)]

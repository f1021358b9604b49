"""Cross-client batching on the split server (sfl.batch_clients, docs/design.md §3.12): for a
server part that treats each sample alone (no dropout, no BatchNorm), sync's step over several
clients' batches run as one batch is the same update as one batch at a time, to float32 round-off,
and so lands on the single-process baseline; the split server then runs one forward a step."""
from __future__ import annotations

import pytest

from conftest import TINY, baseline, load_model, max_diff, metrics, mpirun, ok, sets

TOL = 2e-5
COMMON = TINY + ["train.clients=5", "train.aggregate_every=1", "train.momentum=0.9", "train.batch_size=8"]
SPLITS = {"u": ['model.split="u"'], "u-frozen": ['model.split="u"', "model.freeze_encoder=true"],
          "label-sharing": ['model.split="label-sharing"']}


@pytest.mark.parametrize("split", list(SPLITS))
def test_batched_step_is_the_unbatched_step(split, tmp_path):
    common = COMMON + ['model.name="lenet5"' if split == "u-frozen" else 'model.name="mlp"'] + SPLITS[split]
    runs = {}
    for batched in (True, False):  # 5 logical clients on 2 client ranks (3 + 2), 2 split servers
        out = tmp_path / str(batched)
        ok(mpirun(5, "train", *sets(common + [f"sfl.batch_clients={str(batched).lower()}", "sfl.servers=2",
                                              'sfl.state="file"', f'run.out_dir="{out}"'])))
        runs[batched] = (load_model(out), metrics(out))
    ok(baseline(*sets(common + [f'run.out_dir="{tmp_path / "base"}"'])))
    ref = load_model(tmp_path / "base")
    steps = 240 // 5 // 8  # each client's shard in batches of 8: 6 steps a round, 5 batches each
    assert [r["server_passes"] for r in runs[True][1]] == [steps * 2] * 2   # one pass a step on each server
    assert [r["server_passes"] for r in runs[False][1]] == [steps * 5] * 2  # one a batch
    assert max_diff(runs[True][0], runs[False][0]) < TOL
    assert max_diff(runs[True][0], ref) < TOL and max_diff(runs[False][0], ref) < TOL


def test_a_dropout_body_is_not_batched(tmp_path):
    """cnn's server part has dropout, whose masks are drawn per client batch: one pass a batch."""
    ok(mpirun(4, "train", *sets(TINY + ["train.clients=3", 'model.name="cnn"', "train.rounds=1",
                                        f'run.out_dir="{tmp_path}"'])))
    assert [r["server_passes"] for r in metrics(tmp_path)] == [3 * (240 // 3 // 16)]

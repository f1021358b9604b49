"""The split server's grouping of client batches for cross-client batching, in-process."""
from __future__ import annotations

from types import SimpleNamespace

from mpi_sfl.serving import GROUP_ROWS, batch_groups


def groups(mode: str, rank_of: dict[int, int], sizes: dict[int, int]) -> list[list[int]]:
    server = SimpleNamespace(cfg=SimpleNamespace(sfl=SimpleNamespace(batch_clients=mode)), rank_of=rank_of)
    plan = SimpleNamespace(batch_len=lambda c, step: sizes[c])
    return batch_groups(server, plan, 0, list(sizes))


def test_groups_follow_the_ranks_and_stop_at_group_rows():
    """"rank": a client rank's logical clients, in order; "step": all of them; both cut where the
    next batch would take a group past GROUP_ROWS samples (a batch larger than that runs alone), so
    a pass's activations are bounded however many clients a rank hosts."""
    rank_of = {0: 3, 1: 3, 2: 3, 3: 4, 4: 4}
    small = dict.fromkeys(range(5), 32)
    assert groups("rank", rank_of, small) == [[0, 1, 2], [3, 4]]
    assert groups("step", rank_of, small) == [[0, 1, 2, 3, 4]]
    big = dict.fromkeys(range(5), GROUP_ROWS // 2)
    assert groups("rank", rank_of, big) == [[0, 1], [2], [3, 4]]
    assert groups("step", rank_of, big) == [[0, 1], [2, 3], [4]]
    assert groups("step", rank_of, {**big, 1: GROUP_ROWS + 1}) == [[0], [1], [2, 3], [4]]
    many = {c: 128 for c in range(64)}  # the memory suite's 32-in-flight case, and more
    assert all(sum(many[c] for c in g) <= GROUP_ROWS for g in groups("rank", dict.fromkeys(many, 3), many))


def test_what_is_batched():
    """Exact only without running buffers (resnet18's BatchNorm: never); dropout (cnn) is batched
    when asked for ("rank", "step"), and "auto" leaves it one batch at a time; only sync batches."""
    from mpi_sfl import models
    from mpi_sfl.serving import batches_clients
    bodies = {name: models.build(name, 0, input_shape=(3, 32, 32) if name == "resnet18" else (1, 28, 28)).body
              for name in ("mlp", "cnn", "resnet18")}

    def cfg(mode, variant="sync"):
        return SimpleNamespace(sfl=SimpleNamespace(batch_clients=mode, variant=variant))
    got = {(mode, name): batches_clients(cfg(mode), body) for mode in ("auto", "rank", "step", "off")
           for name, body in bodies.items()}
    assert got == {("auto", "mlp"): True, ("auto", "cnn"): False, ("auto", "resnet18"): False,
                   ("rank", "mlp"): True, ("rank", "cnn"): True, ("rank", "resnet18"): False,
                   ("step", "mlp"): True, ("step", "cnn"): True, ("step", "resnet18"): False,
                   ("off", "mlp"): False, ("off", "cnn"): False, ("off", "resnet18"): False}
    assert not batches_clients(cfg("rank", "v1"), bodies["mlp"])

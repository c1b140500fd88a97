"""The runner's per-step inputs and block transfers: the vectorised slot mapping and positions
against a per-token Python reference, block tables, and device <-> host block copies."""

import pytest
import torch

from kvserve.config import ModelSpec
from kvserve.kvcache.layout import KVLayout
from kvserve.kvstore.host import HostBlockStore
from kvserve.kvstore.paged import PagedKVStore
from kvserve.runner.input_builder import InputBuilder
from kvserve.scheduler.plan import BlockTransfer, ScheduledSeq, StepPlan, Tier, swap_keys

BS = 4


def plan() -> StepPlan:
    return StepPlan((
        ScheduledSeq("a", (5, 6, 7, 8, 9, 10), 0, True, (3, 7)),  # prefill of 6
        ScheduledSeq("b", (11,), 9, True, (0, 2, 5)),  # decode at position 9
        ScheduledSeq("c", (12, 13, 14), 5, False, (4, 1, 6)),  # a chunk after 5 cached
    ))


def reference_slots(p: StepPlan) -> list[int]:
    return [s.block_ids[pos // BS] * BS + pos % BS for s in p.seqs
            for pos in range(s.start_position, s.start_position + len(s.token_ids))]


def test_slot_mapping_positions_and_tables_match_the_per_token_reference():
    step = InputBuilder(torch.device("cpu"), BS).build(plan())
    meta, paged = step.meta, step.meta.paged
    assert step.input_ids.tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert step.positions.tolist() == [0, 1, 2, 3, 4, 5, 9, 5, 6, 7]
    assert paged.slot_mapping.tolist() == reference_slots(plan())
    assert paged.block_tables.tolist() == [[3, 7, 0], [0, 2, 5], [4, 1, 6]]
    assert paged.block_tables.dtype == torch.int32 and paged.context_lens.tolist() == [6, 10, 8]
    assert paged.num_blocks == (2, 3, 2)
    assert [(s.row_start, s.num_new_tokens) for s in meta.seqs] == [(0, 6), (6, 1), (7, 3)]
    assert not meta.is_decode and meta.max_context_len == 10
    decode = paged.decode  # the one decode sequence of this mixed step: b, in row 6
    assert decode.rows.tolist() == [6] and decode.block_tables.tolist() == [[0, 2, 5]]
    assert decode.context_lens.tolist() == [10] and decode.max_context_len == 10


def test_a_decode_step_uses_its_own_tables_and_a_prefill_step_has_no_decode_rows():
    decode_only = StepPlan((ScheduledSeq("b", (11,), 9, True, (0, 2, 5)),
                            ScheduledSeq("d", (3,), 2, True, (1,))))
    paged = InputBuilder(torch.device("cpu"), BS).build(decode_only).meta.paged
    assert paged.decode.rows is None and paged.decode.block_tables is paged.block_tables
    assert paged.decode.max_context_len == 10
    prefill_only = StepPlan((plan().seqs[0], plan().seqs[2]))
    assert InputBuilder(torch.device("cpu"), BS).build(prefill_only).meta.paged.decode is None


def test_unpaged_steps_carry_no_block_tables():
    step = InputBuilder(torch.device("cpu")).build(plan())
    assert step.meta.paged is None and step.positions.tolist()[6] == 9


def test_a_table_too_short_for_the_step_is_refused():
    short = StepPlan((ScheduledSeq("a", (1, 2, 3, 4, 5), 0, True, (0,)),))
    with pytest.raises(RuntimeError, match="a has 1 blocks for 5 tokens"):
        InputBuilder(torch.device("cpu"), BS).build(short)


def test_transfers_must_touch_the_device_and_name_every_block():
    with pytest.raises(ValueError, match="2 block ids but 1 keys"):
        BlockTransfer(Tier.DEVICE, Tier.HOST, (1, 2), ("k",))
    with pytest.raises(ValueError, match="host -> host"):
        BlockTransfer(Tier.HOST, Tier.HOST, (1,), ("k",))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_blocks_round_trip_through_host_memory_by_key(dtype):
    spec = ModelSpec(name="t", num_layers=2, hidden_size=16, intermediate_size=32, num_heads=4,
                     num_kv_heads=2, head_dim=4, vocab_size=10, max_position_embeddings=64)
    store = PagedKVStore(KVLayout(spec, BS, dtype), 6, torch.device("cpu"))
    for t in store.parts.values():
        t.copy_(torch.randn(t.shape))
    before = {name: t.clone() for name, t in store.parts.items()}
    host = HostBlockStore()
    keys = swap_keys("r", 2)
    host.put(keys, store.read_blocks((4, 1)), owner="r")
    assert len(host) == 2
    for t in store.parts.values():
        t.zero_()
    # back in other blocks, and in the opposite order of the keys
    store.write_blocks((0, 5), host.take((keys[1], keys[0])))
    for name, t in store.parts.items():
        assert torch.equal(t[:, 0], before[name][:, 1])
        assert torch.equal(t[:, 5], before[name][:, 4])
    assert len(host) == 0
    assert host.owned == {} and host.owner_of == {}  # taking back forgets the owner too
    for _ in range(3):  # swapped out and in again: nothing accumulates
        host.put(keys, store.read_blocks((0, 5)), owner="r")
        store.write_blocks((0, 5), host.take(keys))
    assert host.owned == {} and host.owner_of == {}
    host.put(keys, store.read_blocks((0, 5)), owner="r")
    host.release_owner("r")  # the request ended while swapped out
    assert len(host) == 0 and host.owned == {} and host.owner_of == {}

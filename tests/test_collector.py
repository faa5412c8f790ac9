"""A generation runs with the objects made before it out of the garbage collector's way (collector.py)."""

import gc
import weakref

import pytest

import duoserve_core
from duoserve_core.events import StepEvent
from duoserve_core.collector import CollectorMeter, long_lived_objects_frozen


@pytest.fixture(autouse=True)
def nothing_frozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


class _Node:
    pass


def test_the_block_freezes_what_exists_and_gives_it_back():
    before = _Node()
    with long_lived_objects_frozen():
        assert gc.get_freeze_count() > 0
        frozen = gc.get_freeze_count()
        made_inside = _Node()
        assert gc.get_freeze_count() == frozen  # what the block makes is not frozen
    assert gc.get_freeze_count() == 0
    assert gc.is_tracked(before) and gc.is_tracked(made_inside)


def test_a_cycle_made_inside_is_still_collected_inside():
    with long_lived_objects_frozen():
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None


def test_a_cycle_made_before_waits_for_the_block_to_end():
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    with long_lived_objects_frozen():
        gc.collect()
        assert gone() is not None  # frozen: the collector does not look at it
    gc.collect()
    assert gone() is None


def test_nested_blocks_unfreeze_once_the_outermost_ends():
    with long_lived_objects_frozen():
        with long_lived_objects_frozen():
            pass
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def test_the_block_freezes_after_a_callers_own_freeze_too():
    """The H200 machine's Python starts with a few hundred objects frozen: the block must freeze anyway."""
    holder = [_Node()]
    gc.freeze()
    callers = gc.get_freeze_count()
    holder.append(_Node())
    with long_lived_objects_frozen():
        assert gc.get_freeze_count() > callers
    assert gc.get_freeze_count() == 0


def test_the_meter_times_the_collections_inside_its_block_only():
    with CollectorMeter() as meter:
        gc.collect()
        gc.collect(0)
    assert meter.collections == 2 and 0 < meter.longest_s <= meter.seconds
    gc.collect()
    assert meter.collections == 2 and meter._on_collection not in gc.callbacks


def test_generate_and_generate_many_run_frozen_and_report_the_collectors_time(tiny_checkpoint):
    rt = duoserve_core.load(tiny_checkpoint, device="cpu", quant="none", memory_budget="100%")
    during = []

    def at_each_layer(event):
        if isinstance(event, StepEvent) and event.kind == "layer_done":
            during.append(gc.get_freeze_count())
            if len(during) == 3:  # one full collection inside the call, which its result must count
                gc.collect()
    rt.events.subscribe(at_each_layer)
    result = rt.generate(prompt_ids=[3, 4, 5], max_new_tokens=3, stop_at_eos=False)
    assert during and min(during) > 0
    assert gc.get_freeze_count() == 0
    assert 0 < result.gc_longest_pause_s <= result.gc_pause_s == result.as_dict()["gc_pause_s"]
    during.clear()
    run = rt.generate_many([[3, 4, 5], [6, 7]], max_new_tokens=2, stop_at_eos=False)
    assert during and min(during) > 0
    assert gc.get_freeze_count() == 0
    assert 0 < run.gc_longest_pause_s <= run.gc_pause_s

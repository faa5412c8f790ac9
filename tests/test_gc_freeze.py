"""A generation runs with the objects made before it out of the garbage collector's way (gc_freeze.py)."""

import gc
import weakref

import pytest

import duoserve_core
from duoserve_core.events import StepEvent
from duoserve_core.gc_freeze import long_lived_objects_frozen


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


def test_generate_and_generate_many_run_frozen(tiny_checkpoint):
    rt = duoserve_core.load(tiny_checkpoint, device="cpu", quant="none", memory_budget="100%")
    during = []
    rt.events.subscribe(lambda e: during.append(gc.get_freeze_count())
                        if isinstance(e, StepEvent) and e.kind == "layer_done" else None)
    rt.generate(prompt_ids=[3, 4, 5], max_new_tokens=3, stop_at_eos=False)
    assert during and min(during) > 0
    assert gc.get_freeze_count() == 0
    during.clear()
    rt.generate_many([[3, 4, 5], [6, 7]], max_new_tokens=2, stop_at_eos=False)
    assert during and min(during) > 0
    assert gc.get_freeze_count() == 0

"""sharing.converted: one conversion per memory under one live fn while the memory is
unchanged, forgotten after."""

import gc

import pytest
import torch

from otq_kernels import sharing
from otq_kernels.sharing import converted, memory_key


def test_views_of_one_memory_get_one_result_while_fn_lives():
    base = torch.arange(6.0)
    a, b = base[:], base.detach()  # two tensor objects, one view of one memory
    calls = []

    def fn(t):
        calls.append(t)
        return t * 2

    first = converted(fn, a, fn)
    assert converted(fn, b, fn) is first and len(calls) == 1
    assert converted(fn, base[1:], fn) is not first  # another view: converted apart
    assert converted(lambda t: t, b, fn) is not first  # another fn
    del fn
    gc.collect()
    assert not any(key[1] == memory_key(a) for key in sharing._RESULTS)


def test_forgotten_when_the_memory_is_freed():
    def fn(t):
        return t + 1

    t = torch.ones(4)
    converted(fn, t, fn)
    assert sharing._RESULTS
    del t
    gc.collect()
    assert not sharing._RESULTS
    again = torch.ones(4)  # (may reuse the freed memory: must not get the old result)
    out = converted(fn, again, lambda t: t + 5)
    assert torch.equal(out, torch.full((4,), 6.0))
    del again, out
    gc.collect()


@pytest.mark.parametrize("make", [lambda: torch.empty(0), lambda: torch.ones(3, device="meta")],
                         ids=["empty", "meta"])
def test_tensors_without_memory_share_a_result_only_with_themselves(make):
    """(meta tensors all point at address 0: only the object tells them apart)"""
    t, other = make(), make()

    def fn(t):
        return t.clone()

    assert converted(fn, t, fn) is converted(fn, t, fn)
    assert converted(fn, other, fn) is not converted(fn, t, fn)
    del t, other
    gc.collect()
    assert not sharing._RESULTS


def test_memory_written_since_is_converted_again():
    t = torch.ones(4)

    def fn(t):
        return t.clone()

    first = converted(fn, t, fn)
    t[1:].zero_()  # (through a view: views share the version counter)
    again = converted(fn, t.detach(), fn)
    assert again is not first and torch.equal(again, torch.tensor([1.0, 0, 0, 0]))


def test_an_fn_without_weak_references_converts_each_view_apart():
    t = torch.ones(3)
    fn = torch.Tensor.double  # (a method descriptor takes no weak reference)
    assert converted(fn, t, fn) is not converted(fn, t, fn)
    assert not sharing._RESULTS


def test_a_result_in_the_memory_it_came_from_is_not_remembered():
    """(every view converts to a view of the same memory anyway; an entry would keep the
    memory alive for as long as a long-lived fn lives)"""
    t = torch.ones(3)

    def same(t):
        return t

    def view(t):
        return t[:]

    assert converted(same, t, same) is t
    assert converted(view, t, view).data_ptr() == t.data_ptr()
    meta = torch.ones(2, device="meta")
    assert converted(same, meta, same) is meta
    assert not sharing._RESULTS

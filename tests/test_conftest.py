"""The test set-up itself (tests/conftest.py): which tests it skips without a GPU."""

import conftest
import pytest


class _Item:
    """What the skipping reads of a collected test: its markers and its keywords."""

    def __init__(self, markers: set, keywords: set):
        self.markers, self.keywords, self.added = markers, keywords, []

    def get_closest_marker(self, name):
        return name if name in self.markers else None

    def add_marker(self, marker):
        self.added.append(marker)


@pytest.mark.skipif(conftest.HAS_CUDA, reason="only a machine without a GPU skips tests")
def test_only_tests_marked_cuda_are_skipped_not_a_parameter_named_cuda():
    marked = _Item({"cuda"}, {"cuda", "test_kernel"})
    named = _Item(set(), {"cuda", "test_device_names[cuda]"})  # (its parameter id)
    conftest.pytest_collection_modifyitems(None, [marked, named])
    assert [m.kwargs for m in marked.added] == [{"reason": "needs a CUDA GPU"}]
    assert named.added == []

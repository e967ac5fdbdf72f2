"""A process holds one model's networks, sessions and sets at a time: once its items move on to
another model's, the finished model's handle (and what its memo holds) is released."""
from __future__ import annotations

import gc
import textwrap
import weakref

import pytest

from tooling.locations import Roots
from tooling.workspace import Workspace

pytest_plugins = ["pytester"]


def test_release_drops_the_handle_and_what_it_memoises(tmp_path):
    zoo = Workspace(Roots.resolve(cache_dir=tmp_path / "cache"))
    handle = zoo.model("videopose3d")
    handle.memo["agreement_set"] = memoised = type("Set", (), {})()
    gone = weakref.ref(memoised)
    del handle, memoised
    assert zoo.held_models == ("videopose3d",)
    assert zoo.release("videopose3d") is True
    gc.collect()
    assert zoo.held_models == () and gone() is None
    assert zoo.release("videopose3d") is False  # nothing held: nothing to do
    assert zoo.model("videopose3d").memo == {}  # asked again: a new handle, built from the cache


RELEASE_PROBE = '''
import pytest

SEEN = []


@pytest.mark.parametrize("model, step", [("toynet", 1), ("toynet", 2), ("toytwin", 3), ("toytwin", 4)])
def test_uses_model(zoo, known_answers, model, step):
    handle = zoo.model(model)
    SEEN.append((zoo.held_models, id(handle), id(known_answers(model))))


def test_only_the_running_model_was_held():
    (held1, handle1, set1), (held2, handle2, set2), (held3, _, _), (held4, _, _) = SEEN
    assert held1 == held2 == ("toynet",), "toynet's items share its handle while they run"
    assert (handle1, set1) == (handle2, set2), "the handle and its known-answer set are built once"
    assert held3 == held4 == ("toytwin",), "toynet was released when toytwin's items began"
'''


@pytest.mark.parametrize("workers", [[], ["-n", "1"]], ids=["in-process", "xdist-worker"])
def test_a_model_is_released_when_the_next_item_is_another_models(toy_project, toy_yaml, workers):
    (toy_project.path / "baselines" / "toytwin.yaml").write_text(toy_yaml.replace("model: toynet", "model: toytwin"))
    (toy_project.path / "test_release_probe.py").write_text(textwrap.dedent(RELEASE_PROBE))
    args = workers or ["-p", "no:xdist"]
    result = toy_project.runpytest_subprocess("test_release_probe.py", "-p", "tooling.pytest_plugin", *args,
                                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)

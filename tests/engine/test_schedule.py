"""Longest-first xdist scheduling (tooling/schedule.py): order by last durations, and tests that
share a compiled artifact or per-process references (same module, same parameters) go to one
worker together, so the other never waits on a build lock held for the same artifact."""
from __future__ import annotations

from tooling.schedule import Durations, LongestFirstScheduling, affinity

MODULE = "tests/models/test_toy.py::TestToy::"
COLLECTION = [
    f"{MODULE}test_onnx_matches_torch[net-smoke-b1-torchscript]",
    f"{MODULE}test_deployed_matches_onnx[net-smoke-b1-torchscript-onnxruntime]",
    f"{MODULE}test_deployed_matches_onnx[net-smoke-b1-torchscript-aoti]",
    f"{MODULE}test_decoded_outputs_agree[net-smoke-b1-torchscript-onnxruntime]",
    f"{MODULE}test_decoded_outputs_agree[net-smoke-b1-torchscript-aoti]",
    "tests/models/test_probes.py::test_informative[toy]",
    "tests/models/test_probes.py::test_perturbed[toy]",
    "tests/models/test_probes.py::test_plain",
]


class Node:
    def __init__(self, name: str):
        self.name, self.sent, self.shutting_down = name, [], False
        self.gateway = type("Gateway", (), {"id": name})()

    def send_runtest_some(self, indices):
        self.sent += list(indices)

    def shutdown(self):
        self.shutting_down = True


def scheduler(known: dict[str, float], tmp_path) -> tuple[LongestFirstScheduling, list[Node]]:
    durations = Durations(tmp_path)
    durations.known = known
    sched = LongestFirstScheduling.__new__(LongestFirstScheduling)
    sched.node2collection, sched.node2pending, sched.pending, sched.collection = {}, {}, [], None
    sched.numnodes, sched._order, sched.log = 2, durations.order, lambda *a: None
    nodes = [Node("gw0"), Node("gw1")]
    for node in nodes:
        sched.node2pending[node] = []
        sched.node2collection[node] = list(COLLECTION)
    sched.schedule()
    return sched, nodes


def test_affinity_groups_a_modules_tests_with_the_same_parameters_but_the_backend():
    case = affinity(COLLECTION[0])
    assert case == "tests/models/test_toy.py[net-smoke-b1-torchscript]"
    assert all(affinity(n) == case for n in COLLECTION[:5])
    assert affinity(f"{MODULE}test_deployed_matches_onnx[net-smoke-b1-torchscript-aoti-cuda]") == case
    assert affinity(f"{MODULE}test_onnx_matches_torch[net-smoke_batched-b4-torchscript]") != case
    agreement = {affinity(f"{MODULE}test_accuracy_agrees_with_torch[{b}]") for b in ("onnxruntime", "openvino", "om")}
    assert agreement == {"tests/models/test_toy.py[]"}
    assert affinity(COLLECTION[5]) == affinity(COLLECTION[6]) == "tests/models/test_probes.py[toy]"
    assert affinity(COLLECTION[7]) == COLLECTION[7]


def test_a_models_agreement_rows_and_its_per_model_probes_go_to_one_worker():
    """They share the model's agreement set (one torch eager pass over the known-answer set): run
    back to back, the set is built once although the model is released when its items are done."""
    rows = {affinity(f"tests/models/test_dekr.py::TestDEKR::test_accuracy_agrees_with_torch[{b}]")
            for b in ("onnxruntime", "openvino", "om")}
    probes = {affinity(f"tests/models/test_agreement_sets.py::test_{t}[dekr]") for t in ("informative", "perturbed")}
    assert rows == probes == {affinity("tests/models/test_dekr.py::TestDEKR::test_accuracy_on_staged_dataset[onnxruntime]")}
    assert affinity("tests/models/test_agreement_sets.py::test_informative[fomm]") not in rows
    assert affinity("tests/models/test_dekr.py::TestDEKR::test_onnx_matches_torch[hrnet_dekr-smoke-b1-torchscript]") \
        not in rows


def test_a_compile_and_its_other_rows_go_to_one_worker_longest_first(tmp_path):
    # The AOTI compile is the longest test; its decoded row waited on the build lock last time.
    seconds = [3.0, 1.0, 25.0, 0.5, 20.0, 9.0, 8.0, 0.1]
    sched, (first, second) = scheduler(dict(zip(COLLECTION, seconds)), tmp_path)
    assert first.sent[:5] == [2, 4, 0, 1, 3], "the compile first, then the rows that reuse its graph and references"
    assert second.sent[:2] == [5, 6], "the next longest group on the other"
    every = sorted(first.sent + second.sent)
    assert every == sorted(set(every)) and set(every) <= set(range(len(COLLECTION)))
    while sched.pending:  # each finished test brings its worker the next group
        node = min((first, second), key=lambda n: len(n.sent))
        sched.node2pending[node].clear()
        sched.check_schedule(node)
    assert sorted(first.sent + second.sent) == list(range(len(COLLECTION)))
    for group in ({0, 1, 2, 3, 4}, {5, 6}):
        assert group <= set(first.sent) or group <= set(second.sent)


def test_on_a_fresh_clone_the_compiling_rows_start_first_with_their_group(tmp_path):
    sched, (first, second) = scheduler({}, tmp_path)  # no durations file yet
    assert first.sent[:5] == [2, 4, 0, 1, 3], "the AOTInductor row first, its case's rows with it"
    assert second.sent[:2] == [5, 6], "then collection order"
    assert Durations(tmp_path).expected(f"{MODULE}test_deployed_matches_onnx[net-smoke-b1-torchscript-om]") == 1.0

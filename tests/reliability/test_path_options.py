"""An option's value is never a test path: `pytest -m "dekr and accuracy" --data-root /data/zoo` finds
the suite's config and loads its plugin, in every form a user types (zoo_rootdir.py says why pytest
alone does not). The README's own pytest examples run as written.

Each case runs the real command line in a subprocess. A probe plugin, loaded through PYTEST_PLUGINS
so that the command line stays the user's, records what pytest decided (config file, rootdir, test
paths, option values) once the command line is parsed, and stops the run there: a case costs the
start-up (the suite's imports), not a collection.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from _pytest.config.argparsing import Parser

from tooling import pytest_plugin

PROJECT = Path(__file__).resolve().parents[2]
PATH_OPTIONS = {"--data-root", "--weights-root", "--upstream-root", "--cache-dir", "--zoo-report"}

PROBE = '''
import json, os, sys, pytest

@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    with open(os.environ["PATH_OPTIONS_PROBE"], "w") as out:
        json.dump({"configfile": str(config.inipath), "rootdir": str(config.rootpath), "args": config.args,
                   "options": vars(config.option), "plugin": sys.modules["tooling.pytest_plugin"].__file__}, out, default=repr)
    pytest.exit("probe: command line parsed", returncode=0)
'''


def _free_value_options() -> dict[str, str]:
    """Every option of the suite that takes a value of any form, by name -> dest: each must accept a
    path. Found from the plugin itself, so an option added later is covered without naming it."""
    parser = Parser(_ispytest=True)
    pytest_plugin.pytest_addoption(parser)
    options = {}
    for group in parser._groups:
        for option in group.options:
            action = option._action
            if isinstance(action, argparse._StoreAction) and action.type is None and action.choices is None:
                options[max(action.option_strings, key=len)] = action.dest
    return options


def _environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "ZOO_"))}
    (tmp_path / "path_options_probe.py").write_text(PROBE)
    return {**env, "PYTHONPATH": str(tmp_path), "PYTEST_PLUGINS": "path_options_probe",
            "PATH_OPTIONS_PROBE": str(tmp_path / "decided.json"), **extra}


def _decided(command: list[str], cwd: Path, tmp_path: Path) -> dict:
    run = subprocess.run(command, cwd=cwd, env=_environment(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"{shlex.join(command)} (in {cwd}):\n{run.stdout[-3000:]}{run.stderr[-3000:]}"
    return json.loads((tmp_path / "decided.json").read_text())


def test_the_suite_has_path_options_to_check():
    assert PATH_OPTIONS <= set(_free_value_options())


# From the root and from tests/: the space form with a value outside the checkout (the one pytest
# alone gets wrong), with and without a test path; the = form; a value inside the checkout. Each
# case costs a process start (the suite's imports), so the CPU tier runs one case per way through
# zoo_rootdir.py (setup retaken without and with a test path, nothing taken for the = form, taken
# but already right for a value inside) with both start directories among them; the nightly runs
# the other four.
CASES = [(cwd, form, where, test_path) for cwd in (".", "tests") for form, where, test_path in (
    ("space", "outside", None), ("space", "outside", "tests/reliability"), ("equals", "outside", None),
    ("space", "inside", None))]
CPU_TIER_CASES = {(".", "space", "outside", None), ("tests", "space", "outside", "tests/reliability"),
                  (".", "equals", "outside", None), ("tests", "space", "inside", None)}


@pytest.mark.parametrize(("cwd", "form", "where", "test_path"), [
    pytest.param(*case, id="-".join(filter(None, case)).replace(".", "root"),
                 marks=() if case in CPU_TIER_CASES else pytest.mark.slow) for case in CASES])
def test_an_option_value_is_never_a_test_path(cwd, form, where, test_path, tmp_path):
    invocation_dir = PROJECT / cwd
    values = {}
    for name in _free_value_options():
        if where == "outside":  # an existing directory per option, outside the checkout
            value = tmp_path / "staged" / name.strip("-")
            value.mkdir(parents=True)
            values[name] = str(value)
        else:  # an existing directory of the checkout, relative to where pytest starts
            values[name] = os.path.relpath(PROJECT / "baselines", invocation_dir)
    command = [sys.executable, "-m", "pytest", "-m", "dekr and accuracy"]
    for name, value in values.items():
        command += [name, value] if form == "space" else [f"{name}={value}"]
    if test_path:
        command.append(os.path.relpath(PROJECT / test_path, invocation_dir))

    decided = _decided(command, invocation_dir, tmp_path)

    assert (decided["configfile"], decided["rootdir"]) == (str(PROJECT / "pyproject.toml"), str(PROJECT))
    assert decided["options"]["importmode"] == "importlib"  # the config's addopts were applied
    # this checkout's plugin, whatever checkout the venv has installed
    assert decided["plugin"] == str(PROJECT / "tooling" / "pytest_plugin.py")
    chosen = {name: decided["options"][dest] for name, dest in _free_value_options().items()}
    assert chosen == values
    expected_paths = [PROJECT / (test_path or "tests")] if test_path or cwd == "." else [invocation_dir]
    assert [(invocation_dir / arg).resolve() for arg in decided["args"]] == expected_paths


def _readme_commands() -> list[tuple[dict[str, str], list[str]]]:
    """(exported variables, argv) of each pytest command in README.md's code blocks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (PROJECT / "README.md").read_text(), re.S):
        exported: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["export"]:
                exported.update(word.split("=", 1) for word in words[1:])
            elif "pytest" in words[:3]:
                commands.append((dict(exported), words))
    return commands


def _runnable(words: list[str], tmp_path: Path) -> list[str]:
    """The command as written, made cheap and harmless: --collect-only (running the selections takes
    minutes to hours), no xdist workers (-n N changes how tests are spread, not which are selected),
    and report files written under tmp_path instead of the checkout's reports/."""
    interpreter = {".venv/bin/python": [sys.executable], "python": [sys.executable],
                   "pytest": [str(Path(sys.executable).with_name("pytest"))]}
    command = interpreter[words[0]] + words[1:]
    command = [str(tmp_path / Path(word).name) if word.startswith("reports/") else word for word in command]
    for i, word in enumerate(command[:-1]):
        if word == "-n":
            command[i + 1] = "0"
    return command + ["--collect-only", "-q"]


def test_readme_has_pytest_examples():
    assert len(_readme_commands()) >= 4


# The nightly's own commands (they ask for --nightly) are checked in the nightly tier, which runs
# them as written on its hosts: a collection of the whole suite each, a process start each.
@pytest.mark.parametrize("index", [
    pytest.param(i, marks=pytest.mark.slow if "--nightly" in words else ())
    for i, (_, words) in enumerate(_readme_commands())])
def test_readme_pytest_example_runs_as_written(index, tmp_path):
    exported, words = _readme_commands()[index]
    command = _runnable(words, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "ZOO_"))}
    env["ZOO_CACHE_DIR"] = os.environ.get("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    run = subprocess.run(command, cwd=PROJECT, env={**env, **exported}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"{shlex.join(words)}:\n{run.stdout[-3000:]}{run.stderr[-3000:]}"
    assert re.search(r"\d+(/\d+)? tests? collected", run.stdout), run.stdout[-2000:]


def test_a_path_after_a_flag_is_a_test_path(tmp_path):
    """--nightly takes no value: the path after it is a test path after all, and the run says so
    instead of running this checkout's config on it."""
    run = subprocess.run([sys.executable, "-m", "pytest", "--nightly", str(tmp_path)], cwd=PROJECT,
                         env=_environment(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert f"{tmp_path}: pytest first took this for an option's value" in run.stderr
    assert "the option before it takes no value, so it is a test path" in run.stderr


def test_a_value_inside_another_project_is_a_usage_error(tmp_path):
    """A value below another pytest config: that config was applied before the value could be told
    from a test path, so the run stops and says which form to write."""
    other = tmp_path / "other-project"
    (other / "data").mkdir(parents=True)
    (other / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "--data-root", str(other / "data")], cwd=PROJECT,
                         env=_environment(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert f"applied the config above it, {other / 'pytest.ini'}, instead of {PROJECT / 'pyproject.toml'}" in run.stderr
    assert "Write the option as --option=value" in run.stderr

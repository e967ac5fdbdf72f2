"""pytest11 entry point: find the suite's configuration when an option's value looked like a test path.

pytest decides its rootdir and config file from the command line before the plugins that config
names have registered their options. In ``pytest -m "dekr and accuracy" --data-root /data/zoo`` it
does not know ``--data-root`` yet, counts ``/data/zoo`` as a test path, finds no config above it and
never loads the suite: "unrecognized arguments: --data-root" (pytest-dev/pytest#1435, #8846, #13351;
the ``--data-root=/data/zoo`` form is not affected). An installed entry point is loaded right after
that decision, before the initial conftests and the full parse, so it can take the decision again the
way pytest would have taken it had it known the option: a path that directly follows an option pytest
did not know yet is that option's value, not a test path. Nothing here names an option, so every
path-valued option of the suite, present or future, is covered.

This module is installed (``pip install -e .``, done by .ci/install) and imported before pytest knows
which checkout it runs in; it may come from another checkout that shares the venv. So it must not
import ``tooling``: once the config is found, its ``pythonpath`` puts the right checkout first.
"""
from __future__ import annotations

import copy
from collections.abc import Generator
from pathlib import Path

import pytest
# Private, but the only place pytest's own rootdir rule lives; pytest is pinned (requirements.txt)
# and tests/reliability/test_path_options.py runs the real command lines against it.
from _pytest.config.findpaths import determine_setup, parse_override_ini


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser,
                                  args: list[str]) -> Generator[None]:
    # Outermost wrapper: capture and the conftest loader then see the retaken setup.
    _retake_setup(early_config, parser, args)
    return (yield)


def values_taken_for_test_paths(parser: pytest.Parser, args: list[str]) -> list[str]:
    """Arguments pytest counted as test paths that directly follow a ``--option`` it did not know."""
    known, unknown = parser.parse_known_and_unknown_args(list(args))
    unknown_options = {arg for arg in unknown if arg.startswith("--") and "=" not in arg}
    positional = list(known.file_or_dir)
    taken = []
    for option, value in zip(args, args[1:]):
        if option == "--":
            break
        if option in unknown_options and value in positional:
            positional.remove(value)
            taken.append(value)
    return taken


def _retake_setup(config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    taken = values_taken_for_test_paths(parser, args)
    namespace = parser.parse_known_args(list(args))
    if not taken or namespace.inifilename:
        return  # nothing was mistaken, or -c names the config and no argument can move it

    def setup(test_paths):
        return determine_setup(inifile=None, override_ini=namespace.override_ini, args=test_paths,
                               rootdir_cmd_arg=namespace.rootdir or None,
                               invocation_dir=config.invocation_params.dir)

    test_paths = list(namespace.file_or_dir)
    for value in taken:
        test_paths.remove(value)
    rootpath, inipath, inicfg, ignored = setup(test_paths)
    if inipath is None or (rootpath, inipath) == (config.rootpath, config.inipath):
        return
    if config.inipath is not None:
        # The config found above the value has had its addopts and plugins applied already, and
        # they cannot be taken back.
        raise pytest.UsageError(
            f"{', '.join(taken)}: pytest took this for a test path and applied the config above it, "
            f"{config.inipath}, instead of {inipath}. Write the option as --option=value, or name "
            f"the config with -c {inipath}.")
    _adopt(config, parser, args, rootpath, inipath, inicfg, ignored)
    _check_values_were_option_values(config, parser, args, taken, setup, (rootpath, inipath))


def _adopt(config, parser, args, rootpath: Path, inipath: Path, inicfg, ignored) -> None:
    """What Config.parse does once it has a config file, done again with the retaken one."""
    config._rootpath, config._inipath = rootpath, inipath
    config._inicfg, config._ignored_config_files = inicfg, ignored
    config._inicache.clear()
    parser.extra_info.update(rootdir=str(rootpath), inifile=str(inipath))
    addopts = list(config.getini("addopts"))
    args[:] = addopts + args
    namespace = parser.parse_known_args(args, namespace=copy.copy(config.option))
    if overrides := parse_override_ini(namespace.override_ini):
        config._inicfg.update(overrides)
        config._inicache.clear()
    config._checkversion()
    config._configure_python_path()
    config.pluginmanager.consider_preparse(addopts, exclude_only=False)
    config.known_args_namespace = namespace = parser.parse_known_args(args, namespace=copy.copy(config.option))
    config._validate_plugins()
    if namespace.confcutdir is None:
        namespace.confcutdir = str(inipath.parent)


def _check_values_were_option_values(config, parser, args, taken, setup, adopted) -> None:
    """With the config's plugins loaded, the options are known. Had one of them been a flag, the path
    after it was a test path after all, and the setup must be what that path gives. An option still
    unknown is left to pytest's own parse, which reports it against the right config."""
    still_unknown = values_taken_for_test_paths(parser, args)
    test_paths = [path for path in parser.parse_known_args(list(args)).file_or_dir if path not in still_unknown]
    flagged = [value for value in taken if value in test_paths]
    if not flagged or setup(test_paths)[:2] == adopted:
        return
    raise pytest.UsageError(
        f"{', '.join(flagged)}: pytest first took this for an option's value and chose the config "
        f"{adopted[1]}, but the option before it takes no value, so it is a test path, which gives "
        f"another rootdir. Put test paths before the options, or name the config with -c.")

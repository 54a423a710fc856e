"""`dbtrimkv --help` and argument errors import neither torch nor transformers (issue 27, item 5).

Why: importing them takes seconds (7-11 s for `--help` before); the parser must be built from light
modules, with the engine imported only when a command runs (`dbtrimkv/commands/lazy.py`). These
tests run in fresh interpreters and assert on the modules loaded, not on time.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "torchvision", "av", "PIL", "numpy", "uvicorn", "gradio")


def _loaded_after(code: str) -> dict:
    probe = (f"import json, sys\n{code}\n"
             f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _main(argv: list[str]) -> str:
    return ("import contextlib, io\nfrom dbtrimkv.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            f"    try:\n        main({argv!r})\n    except SystemExit:\n        pass")


@pytest.mark.parametrize("argv", [
    ["--help"], ["chat", "--help"], ["eval", "synthetic", "--help"], ["watch", "--help"], ["video-qa", "--help"],
    ["serve", "--help"], ["demo", "--help"], ["train", "--help"],
    ["chat", "--budget", "abc", "q"],  # an argument error
    ["chat", "--policy", "nope", "q"],
    ["no-such-command"],
])
def test_help_and_argument_errors_import_no_engine(argv):
    loaded = _loaded_after(_main(argv))
    assert not loaded["torch"] and not loaded["transformers"], loaded
    assert not any(loaded.values()), loaded  # nor any other heavy library


def test_import_dbtrimkv_is_light_and_its_names_load_on_use():
    loaded = _loaded_after("import dbtrimkv\nassert dbtrimkv.__version__")
    assert not loaded["torch"] and not loaded["transformers"]
    loaded = _loaded_after("import dbtrimkv\nassert dbtrimkv.DBTrimKVConfig(memory_size=4).memory_size == 4")
    assert loaded["torch"]  # the config validates its policy, which is torch code


def test_unknown_attribute_is_an_attribute_error():
    import dbtrimkv

    with pytest.raises(AttributeError, match="no_such_name"):
        dbtrimkv.no_such_name  # noqa: B018
    assert {"DBTrimKVPipeline", "load_model"} <= set(dir(dbtrimkv))


def test_the_pipeline_task_is_registered_after_a_light_import():
    """`import dbtrimkv` first, transformers' pipelines later: the task is there (registered on import)."""
    code = ("import dbtrimkv\nfrom transformers.pipelines import PIPELINE_REGISTRY\n"
            "print('dbtrimkv-image-text-to-text' in PIPELINE_REGISTRY.get_supported_tasks())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("True"), result.stderr


def test_the_parser_states_what_the_engine_registers():
    """The names the parser lists without importing the engine are the engine's."""
    from dbtrimkv.commands import arguments
    from dbtrimkv.commands import eval as eval_command
    from dbtrimkv.policies import policy_names, policy_option_defaults
    from dbtrimkv.recall.tasks import TASK_KINDS
    from dbtrimkv.recall.train_gates import GATE_DATA

    assert list(arguments.POLICY_NAMES) == policy_names()
    options = {name: policy_option_defaults(name) for name in policy_names()
               if policy_option_defaults(name) and name != "threshold"}  # tau is --threshold
    assert arguments.POLICY_OPTION_DEFAULTS == options
    assert set(eval_command.TASK_KINDS) == set(TASK_KINDS) and eval_command.GATE_DATA == GATE_DATA


def test_a_lookup_alone_does_not_use_up_the_registration():
    """transformers probes modules with `find_spec`; the task must still be registered at the real import."""
    code = ("import importlib.util, dbtrimkv, transformers\n"
            "assert importlib.util.find_spec('transformers.pipelines') is not None\n"
            "from transformers.pipelines import PIPELINE_REGISTRY\n"
            "print('dbtrimkv-image-text-to-text' in PIPELINE_REGISTRY.get_supported_tasks())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("True"), result.stderr


def test_a_command_argument_error_without_eviction_flags_imports_no_engine():
    """`chat ""` is refused by the command itself; with no eviction flag there is nothing to resolve first."""
    loaded = _loaded_after(_main(["chat", ""]))
    assert not loaded["torch"] and not loaded["transformers"], loaded

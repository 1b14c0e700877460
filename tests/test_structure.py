"""The shape of the code: every module imports alone, the import graph of llama/ has no cycle, nothing edits
sys.path, and each training command says, for every one of its settings, whether it defines the run."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from llama.cli import finetune, train
from llama.cli.common import check_classified

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llama"
MODULES = sorted(".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                 for path in PACKAGE.rglob("*.py"))


def imports_of(module: str) -> set[str]:
    """The llama modules that `module` imports, at any depth of its code (function bodies included)."""
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in MODULES and name != module}
    return found


def test_the_import_graph_of_llama_has_no_cycle():
    graph = {module: imports_of(module) for module in MODULES}
    graph["llama"] = set()  # the package's names are imported lazily, on first use (llama/__init__.py)
    done, path = set(), []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(module):] + [module])}")
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in MODULES:
        visit(module)
    for task in ("llama.classifier", "llama.preference"):  # the loop knows no task
        assert task not in graph["llama.trainer"] | graph["llama.checkpoint"]


FRESH_IMPORTS = """
import os, sys, traceback
import numpy, tokenizers, torch, torch._dynamo  # third-party imports, paid once; children import llama afresh
failed = []
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(module)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        failed.append(module)
print(" ".join(failed))
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each llama module imported first, by itself, in a process that has imported no llama module yet."""
    result = subprocess.run([sys.executable, "-c", FRESH_IMPORTS, *MODULES], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_importing_the_generate_command_does_not_load_torch():
    """So that generate.py rejects bad arguments at once, before torch's import."""
    code = "import sys, llama.cli.generate; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0


def test_nothing_outside_conftest_edits_sys_path():
    offenders = []
    for path in ROOT.rglob("*.py"):
        if path == ROOT / "tests" / "conftest.py" or any(part.startswith(".") for part in path.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                    and node.value.id == "sys"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


@pytest.mark.parametrize("command, settings", [(train, train.TrainSettings), (finetune, finetune.FinetuneSettings)])
def test_every_setting_either_defines_the_run_or_may_change_on_resume(command, settings):
    check_classified(settings, command.DEFINES_RUN, command.MAY_CHANGE)

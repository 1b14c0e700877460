"""The shape of the code: every module imports alone, the import graph of llama/ has no cycle, nothing edits
sys.path, and each training command says, for every one of its settings, whether it defines the run."""
import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from llama.cli import finetune, train
from llama import tasks
from llama.settings import check_classified

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
    for task in (f"llama.tasks.{name}" for name in tasks.REGISTRY):  # the loop knows no task
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


def names_of_tasks(path: Path) -> list[str]:
    """Where a module names a fine-tuning task in code: a string, identifier or attribute that is a task's
    name, or a string that says --task NAME (docstrings, which describe, are left out)."""
    names = set(tasks.REGISTRY)
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
            if text in names or any(f"--task {name}" in text for name in names):
                found.append(f"{node.lineno}: {text[:60]!r}")
        elif isinstance(node, ast.Name) and node.id in names:
            found.append(f"{node.lineno}: {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in names:
            found.append(f"{node.lineno}: .{node.attr}")
    return found


def test_no_module_outside_llama_tasks_names_a_task():
    """A new task is one module under llama/tasks/ and one registry line: nothing else in the library or the
    commands asks which task it is (they ask the registry, or the run's own record, llama/tasks/__init__.py).
    The package's export table is the one exception: it lists the function `classify` by its name."""
    offenders = {}
    for path in sorted([*PACKAGE.rglob("*.py"), *ROOT.glob("*.py")]):
        if PACKAGE / "tasks" in path.parents:
            continue
        found = names_of_tasks(path)
        if path == PACKAGE / "__init__.py":
            found = [place for place in found if not place.endswith("'classify'")]
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert not offenders, offenders


def test_the_task_name_check_would_catch_a_task_named_outside(tmp_path):
    leaky = tmp_path / "leaky.py"
    leaky.write_text('"""A docstring may say --task dpo."""\nif settings.task == "dpo":\n    args.classify = 1\n'
                     'print("train it with --task sft")\n')
    assert names_of_tasks(leaky) == ["2: 'dpo'", "3: .classify", "4: 'train it with --task sft'"]


def test_each_command_keeps_its_own_defaults_of_the_shared_settings():
    """The shared training settings are declared once (TrainConfig); train.py and finetune.py change their
    defaults with @defaults, and --help says each command's own."""
    from llama.settings import defaults
    from llama.trainer import TrainConfig

    tuned, pretrained = finetune.FinetuneSettings(dataset=["rows.jsonl"]), train.TrainSettings()
    assert (tuned.lr, tuned.batch_size, tuned.betas, tuned.out) == (1e-4, 4, (0.9, 0.99), "checkpoints/finetune")
    assert (pretrained.lr, pretrained.batch_size, pretrained.betas) == (1e-3, 8, (0.9, 0.95))
    assert TrainConfig().lr == 3e-4 and isinstance(tuned, TrainConfig) and isinstance(pretrained, TrainConfig)
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not shared & {name for name in vars(finetune.FinetuneSettings).get("__annotations__", {})
                         if name not in ("lr", "min_lr", "out", "batch_size", "grad_accum", "warmup_steps", "betas",
                                         "eval_every", "save_every", "keep_last", "sample_prompt")}
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(finetune.FinetuneSettings) if "help" in f.metadata}
    assert helps["lr"].endswith("(default: 0.0001)") and helps["out"].endswith("(default: checkpoints/finetune)")
    with pytest.raises(TypeError, match="@defaults must come under @dataclass"):
        defaults(lr=1.0)(dataclasses.dataclass(type("Wrong", (TrainConfig,), {})))

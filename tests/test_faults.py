"""The fault suite: training survives what goes wrong in real runs, on tiny models.

- A NaN at a chosen step (pretraining, SFT, classification) stops the run before it evaluates or saves
  again; the checkpoints kept are the good ones, and --resume goes on from them.
- SIGINT, SIGTERM and SIGKILL at seeded random points of training, of a checkpoint write and of a
  metrics append: afterwards the newest checkpoint loads, and --resume gives bit for bit the losses of
  an uninterrupted run, with the same newest checkpoint and nothing left over (3 points by default, 27
  with -m slow).
- A full disk (a small tmpfs where this machine lets us mount one, else writes that raise ENOSPC)
  during a save and during a metrics append: one line naming the folder and the space, exit code 2,
  the previous checkpoint intact, no temporary folder left, and --resume once there is room.
- What killed writers leave (hidden .NAME.tmp-* folders) is tidied at the next start, in the run folder
  only; a torn last line of metrics.jsonl is dropped by --resume and by llama.plot.
"""
import contextlib
import errno
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama import load_pretrained
from llama.checkpoint import latest_checkpoint, load_training_checkpoint
from llama.cli import finetune, train
from llama.files import LOCK_FILE
from llama.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SIGNAL_WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}


def train_args(world, out, *extra):
    return ["--data", str(world / "shards"), "--out", str(out), "--preset", "tiny", "--batch-size", "4", "--seq-len",
            "32", "--max-steps", "12", "--warmup-steps", "2", "--lr", "3e-3", "--eval-every", "6", "--eval-tokens",
            "256", "--save-every", "4", "--keep-last", "2", "--log-every", "1", "--sample-prompt", "", *extra]


def records(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def losses(run):
    return {r["step"]: r["loss"] for r in records(run) if "loss" in r}


# --- kill points ---------------------------------------------------------------------------------------

# Runs train.py with a hook that sends SIGNAL to itself at a point of the run: after training step INDEX
# (phase step), after the INDEX-th file operation of the checkpoint writes (phase write: each safetensors
# file, JSON file, fsync of the folder, rename, `latest` pointer and discarded old checkpoint), or halfway
# through writing the INDEX-th line of metrics.jsonl (phase append). Phase count runs to the end and
# prints how many operations of each phase the run made.
DRIVER = r"""
import json, os, sys
number, phase, index = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
import llama.checkpoint as checkpoint, llama.files as files, llama.trainer as trainer
from llama.cli import train

counts = {"write": 0, "append": 0}

def fire():
    os.kill(os.getpid(), number)

def counted(function):
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        counts["write"] += 1
        if phase == "write" and counts["write"] == index:
            fire()
        return result
    return wrapper

for name in ("save_tensors", "write_json", "write_text_atomically", "discard_folder"):
    setattr(checkpoint, name, counted(getattr(checkpoint, name)))
files._fsync_tree = counted(files._fsync_tree)
os.rename = counted(os.rename)  # the two renames that put a new checkpoint folder in place

append_line = files.append_line
def append_in_halves(path, line):
    counts["append"] += 1
    if phase != "append" or counts["append"] != index:
        return append_line(path, line)
    data = (line + "\n").encode()
    with open(path, "ab") as f:
        f.write(data[:len(data) // 2])
    fire()  # SIGKILL ends the process here, with a torn last line
    with open(path, "ab") as f:
        f.write(data[len(data) // 2:])
trainer.append_line = append_in_halves

train_step = trainer.Trainer.train_step
def step_then_fire(self):
    result = train_step(self)
    if phase == "step" and self.step == index:
        fire()
    return result
trainer.Trainer.train_step = step_then_fire

code = train.main(sys.argv[4:])
if phase == "count":
    print(json.dumps(counts))
sys.exit(code)
"""


def run_driver(world, out, number, phase, index):
    return subprocess.run([sys.executable, "-c", DRIVER, str(int(number)), phase, str(index), *train_args(world, out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def straight(tiny_world, tmp_path_factory):
    """The uninterrupted run, through the same driver, and how many write and append operations it made."""
    out = tmp_path_factory.mktemp("straight") / "run"
    result = run_driver(tiny_world, out, 0, "count", 0)
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout.splitlines()[-1])


def kill_points(seed, per_pair=None, pairs=None):
    """Seeded points (signal, phase, where in the phase as a fraction): `per_pair` points for each signal in
    each phase, or one for each of the given (signal, phase) pairs."""
    rng = random.Random(seed)
    pairs = pairs or [(number, phase) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
                      for phase in ("step", "write", "append") for _ in range(per_pair)]
    return [(number, phase, round(rng.random(), 3)) for number, phase in pairs]


# By default one point per signal, each in another phase; -m slow runs 27: 3 for each signal in each phase.
DEFAULT_POINTS = kill_points(16, pairs=[(signal.SIGINT, "append"), (signal.SIGTERM, "step"),
                                        (signal.SIGKILL, "write")])
SLOW_POINTS = kill_points(1616, per_pair=3)


def point_id(point):
    number, phase, fraction = point
    return f"{signal.Signals(number).name}-{phase}-{fraction}"


def survives(world, straight, tmp_path, number, phase, fraction):
    """Kill a run at the point, load its newest checkpoint, --resume it, compare with the straight run."""
    reference, counts = straight
    total = {"step": 11, **counts}[phase]  # steps 1-11: a stop after the last step is no stop
    index = 1 + min(int(fraction * total), total - 1)
    out = tmp_path / "run"
    killed = run_driver(world, out, number, phase, index)
    if number == signal.SIGKILL:
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    else:  # SIGINT and SIGTERM save and stop cleanly
        assert killed.returncode == 0, killed.stderr
        assert "Traceback" not in killed.stderr
    kept = latest_checkpoint(out)
    if phase == "step" and number != signal.SIGKILL and index % 4:  # not a step saved on schedule anyway
        assert f"{SIGNAL_WORDS[number]}: saving step {index} to {out}" in killed.stderr
        assert kept.name == f"step_{index:07d}"
    if kept is not None:  # the newest checkpoint is whole: it loads as a model and as a training state
        assert load_training_checkpoint(kept).state["step"] == int(kept.name.split("_")[1])
        load_pretrained(kept)
    assert train.main(train_args(world, out, "--resume")) == 0
    assert losses(out) == losses(reference)  # every step, bit for bit
    names, expected = {p.name for p in out.iterdir()}, {p.name for p in reference.iterdir()}
    steps = {name for name in names | expected if re.fullmatch(r"step_\d{7}", name)}
    # nothing left over; the same files but checkpoints, of which the newest is the same. The older kept
    # ones may differ: a stop saved one off schedule (step 9, say, which pruned step 8), or a kill came
    # between the last `latest` and the pruning
    assert names - steps == expected - steps and max(names & steps) == max(expected & steps), (names, expected)


@pytest.mark.parametrize("point", DEFAULT_POINTS, ids=point_id)
def test_a_killed_run_resumes_to_the_same_losses(tiny_world, straight, tmp_path, point):
    survives(tiny_world, straight, tmp_path, *point)


@pytest.mark.slow
@pytest.mark.parametrize("point", SLOW_POINTS, ids=point_id)
def test_a_killed_run_resumes_to_the_same_losses_at_many_points(tiny_world, straight, tmp_path, point):
    survives(tiny_world, straight, tmp_path, *point)


# --- NaN at a chosen step ----------------------------------------------------------------------------

def poison_step(monkeypatch, bad_step):
    """Make training step `bad_step` compute NaN: a hook on the embedding's output, for that step only."""
    original = Trainer.train_step

    def train_step(self):
        if self.step + 1 != bad_step:
            return original(self)
        hook = self.model.embed_tokens.register_forward_hook(lambda module, inputs, output: output * float("nan"))
        try:
            return original(self)
        finally:
            hook.remove()

    monkeypatch.setattr(Trainer, "train_step", train_step)


def nan_run_args(task, world, out):
    common = ["--out", str(out), "--batch-size", "4", "--lr", "3e-3", "--max-steps", "9", "--save-every", "4",
              "--keep-last", "0", "--log-every", "3", "--sample-prompt", ""]
    if task == "pretraining":
        return [*train_args(world, out), *common, "--eval-every", "0"]
    model = ["--model", str(world / "model"), "--max-len", "64", "--eval-every", "0", "--val-fraction", "0.1", *common]
    if task == "sft":
        return ["--dataset", str(world / "sft.jsonl"), "--template", "{instruction}: {output}", *model]
    return ["--task", "classify", "--dataset", str(world / "classify.csv"), *model]


@pytest.mark.parametrize("task", ["pretraining", "sft", "classification"])
def test_a_nan_step_stops_the_run_before_it_saves_and_resume_goes_on(tiny_world, tmp_path, capsys, monkeypatch, task):
    main = train.main if task == "pretraining" else finetune.main
    out = tmp_path / "run"
    poison_step(monkeypatch, 6)
    assert main(nan_run_args(task, tiny_world, out)) == 1
    err = capsys.readouterr().err
    assert (f"stopped: the loss became nan at step 6; stopping without saving, the last good checkpoint in {out} "
            "is intact (try a lower --lr)") in err and "Traceback" not in err
    assert [p.name for p in sorted(out.glob("step_*"))] == ["step_0000004"] == [latest_checkpoint(out).name]
    saved = load_training_checkpoint(out / "step_0000004")
    assert all(torch.isfinite(t).all() for t in [*saved.weights.values(), *(m for moments in
               saved.optimizer["state"].values() for m in moments.values())])
    logged = records(out)
    assert max(r["step"] for r in logged) == 5  # nothing of step 6 on, no evaluation of the broken model
    assert all(math.isfinite(value) for r in logged for value in r.values() if isinstance(value, float))
    monkeypatch.undo()
    assert main([*nan_run_args(task, tiny_world, out), "--resume"]) == 0  # from step 4, the last good one
    steps = [r["step"] for r in records(out) if "loss" in r]
    assert steps == list(range(1, 10))
    assert latest_checkpoint(out).name == "step_0000009"


def test_a_nan_before_any_update_names_neither_a_checkpoint_nor_the_learning_rate(tiny_world, tmp_path, capsys,
                                                                                  monkeypatch):
    """A run that stops at step 1 has no checkpoint to call intact, and --lr has not been used yet: the line
    says so, and names what it can be instead."""
    out = tmp_path / "run"
    poison_step(monkeypatch, 1)
    assert train.main(nan_run_args("pretraining", tiny_world, out)) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"stopped: the loss became nan at step 1; stopping without saving, {out} holds no checkpoint yet (before any "
        "update, so --lr is not the cause: the model or the data give values that overflow; check them, or try "
        "--dtype float32)") and "Traceback" not in err
    assert not list(out.glob("step_*"))


# --- a full disk -------------------------------------------------------------------------------------

@contextlib.contextmanager
def small_disk(folder, size):
    """`folder` on a tmpfs of `size` bytes; yields a function that resizes it, or None where mounting fails."""
    folder.mkdir(parents=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mount.returncode:
        yield None
        return
    try:
        yield lambda new_size: subprocess.run(["mount", "-o", f"remount,size={new_size}", str(folder)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def folder_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


class FullDisk:
    """Stands in for the os module in llama/files.py: os.write raises ENOSPC once `full` is set."""

    def __init__(self):
        self.full = False

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)


@pytest.mark.parametrize("disk", ["tmpfs", "simulated"])
def test_a_full_disk_during_a_save_keeps_the_last_checkpoint(tiny_world, straight, tmp_path, capsys, monkeypatch,
                                                             disk):
    reference, _ = straight
    checkpoint_size = folder_bytes(reference / "step_0000012")
    with small_disk(tmp_path / "disk", int(checkpoint_size * 1.5)) if disk == "tmpfs" else \
            contextlib.nullcontext(False) as resize:
        if resize is None:
            pytest.skip("cannot mount a tmpfs here (not root?); the simulated disk runs instead")
        if disk == "simulated":  # the third safetensors file, step 8's model weights, meets a full disk
            from safetensors import SafetensorError

            import llama.files

            calls, save_file = [], llama.files.save_file

            def full_at_the_third(*args, **kwargs):
                calls.append(1)
                if len(calls) == 3:
                    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
                return save_file(*args, **kwargs)

            monkeypatch.setattr(llama.files, "save_file", full_at_the_third)
        out = tmp_path / "disk" / "run"
        assert train.main(train_args(tiny_world, out, "--keep-last", "0")) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in err
        assert re.fullmatch(rf"error: no space left in {re.escape(str(out))} to write step_0000008/: it needs about "
                            r"[0-9.]+ MB and [0-9.]+ (bytes|KB|MB|GB) are free; free some space there, then rerun with "
                            r"--resume: it continues from step_0000004, the last checkpoint, which is intact", lines[0])
        assert sorted(p.name for p in out.iterdir()) == ["latest", "metrics.jsonl", "step_0000004"]  # no .tmp left
        load_pretrained(out)
        if disk == "tmpfs":
            resize(int(checkpoint_size * 8))
        monkeypatch.undo()
        assert train.main(train_args(tiny_world, out, "--resume")) == 0
        assert losses(out) == losses(reference)


@pytest.mark.parametrize("disk", ["tmpfs", "simulated"])
def test_a_full_disk_during_a_metrics_append_stops_with_one_line(tiny_world, tmp_path, capsys, monkeypatch, disk):
    """A run saved at step 10 is resumed, and the disk fills up after step 11: a later line of metrics.jsonl
    cannot be written (on a tmpfs, the first that needs a new page), the run stops, the file holds no torn
    line, and once there is room --resume continues from step 10 again."""
    import llama.files

    out = tmp_path / "disk" / "run"
    args = [*train_args(tiny_world, out), "--save-every", "0", "--eval-every", "0", "--keep-last", "1"]
    with small_disk(tmp_path / "disk", 8 * 2**20) if disk == "tmpfs" else contextlib.nullcontext(False) as resize:
        if resize is None:
            pytest.skip("cannot mount a tmpfs here (not root?); the simulated disk runs instead")
        assert train.main([*args, "--max-steps", "10"]) == 0
        filler, fake_os, original = tmp_path / "disk" / "filler", FullDisk(), Trainer.train_step

        def fill_after_step_11(self):
            result = original(self)
            if self.step == 11 and disk == "tmpfs":
                with open(filler, "wb") as f, contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
            fake_os.full = fake_os.full or (self.step == 11 and disk == "simulated")
            return result

        monkeypatch.setattr(Trainer, "train_step", fill_after_step_11)
        monkeypatch.setattr(llama.files, "os", fake_os)
        capsys.readouterr()
        assert train.main([*args, "--max-steps", "60", "--resume"]) == 2  # a page holds 25 lines: it fails by 37
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in err
        assert re.fullmatch(rf"error: no space left in {re.escape(str(out))} to write a line of metrics.jsonl: it "
                            r"needs about \d+ bytes and [0-9.]+ (bytes|KB|MB|GB) are free; free some space there, then "
                            r"rerun with --resume: it continues from step_0000010, the last checkpoint, which is intact",
                            lines[0])
        logged = list(losses(out))  # every line whole
        assert logged == list(range(1, len(logged) + 1)) and 10 <= len(logged) < 60
        monkeypatch.undo()
        filler.unlink(missing_ok=True)
        assert train.main([*args, "--max-steps", "12", "--resume"]) == 0
        assert list(losses(out)) == list(range(1, 13))


# --- what killed writers leave, and torn metrics -------------------------------------------------------

def test_leftovers_of_killed_saves_are_tidied_at_the_next_start_in_the_run_folder_only(tiny_world, tmp_path):
    out = tmp_path / "run"
    assert train.main(train_args(tiny_world, out, "--max-steps", "4")) == 0
    dead = 2**22 + 12345  # above the kernel's largest pid: no such process
    orphans = [f".step_0000008.tmp-{dead}-0123abcd", f".latest.tmp-{dead}-4567cdef",
               f".step_0000002.del-{dead}-89abcdef"]
    for name in orphans:
        (out / name).mkdir() if "step" in name else (out / name).write_text("step_0000008\n")
        if "step" in name:
            (out / name / "model.safetensors").write_bytes(b"half")
    aside = out / f".step_0000004.old-{dead}-00000000"  # a kill between the two renames of a replacement
    os.rename(out / "step_0000004", aside)
    live = out / f".step_0000006.tmp-{os.getppid()}-11111111"  # a running process's: left alone
    live.mkdir()
    outside = tmp_path / f".run.tmp-{dead}-22222222"  # beside the run folder, not in it: left alone
    outside.mkdir()
    assert train.main(train_args(tiny_world, out, "--max-steps", "8", "--resume")) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["latest", "metrics.jsonl", "step_0000004", "step_0000008",
                                                            live.name])
    assert outside.is_dir() and live.is_dir()
    assert list(losses(out)) == list(range(1, 9))


def test_a_torn_last_metrics_line_is_dropped_by_resume_and_plot(tiny_world, tmp_path, capsys):
    from llama import plot

    out = tmp_path / "run"
    assert train.main(train_args(tiny_world, out, "--max-steps", "6")) == 0
    whole = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(whole + '{"step": 7, "loss": 5.4')  # what a full disk left, once
    capsys.readouterr()
    assert plot.main([str(out)]) == 0
    err = capsys.readouterr().err
    assert err == (f"warning: the last line of {out / 'metrics.jsonl'} is cut short (a crash or a full disk during "
                   "a write); plotting the lines before it\n")
    assert train.main(train_args(tiny_world, out, "--max-steps", "8", "--resume")) == 0
    assert list(losses(out)) == list(range(1, 9))
    # a broken line that is not the last is no accident of an append: an error naming the file and line
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([*lines[:2], "{oops", *lines[2:]]) + "\n")
    capsys.readouterr()
    assert plot.main([str(out)]) == 2
    assert capsys.readouterr().err == (f"error: {out / 'metrics.jsonl'} line 3 is not valid JSON (Expecting property "
                                       "name enclosed in double quotes: line 1 column 2 (char 1)); delete or mend "
                                       "that line\n")
    assert train.main(train_args(tiny_world, out, "--max-steps", "8", "--resume")) == 2
    assert f"error: {out / 'metrics.jsonl'} line 3 is not valid JSON" in capsys.readouterr().err


def test_sigterm_saves_like_ctrl_c(tiny_world, tmp_path):
    """What Slurm and Kubernetes send before they kill a job: the run saves the step it is on and stops."""
    out = tmp_path / "run"
    result = run_driver(tiny_world, out, signal.SIGTERM, "step", 5)
    assert result.returncode == 0, result.stderr
    assert f"terminated (SIGTERM): saving step 5 to {out}" in result.stderr
    assert latest_checkpoint(out).name == "step_0000005"
    assert max(losses(out)) == 5


def test_a_second_signal_stops_at_once_in_one_line(tiny_world, tmp_path):
    out = tmp_path / "run"
    twice = ("def fire():\n    import time\n    for _ in range(2):\n        os.kill(os.getpid(), number)\n"
             "        time.sleep(0.5)")
    script = DRIVER.replace("def fire():\n    os.kill(os.getpid(), number)", twice)
    assert script != DRIVER
    result = subprocess.run([sys.executable, "-c", script, str(int(signal.SIGINT)), "step", "5",
                             *train_args(tiny_world, out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 130
    assert result.stderr.rstrip().endswith("stopped at once by a second interrupt, without saving; the last "
                                           "checkpoint is intact") and "Traceback" not in result.stderr
    assert latest_checkpoint(out).name == "step_0000004"


# --- two runs on one folder ------------------------------------------------------------------------------

# Runs train.py, paused after the first training step it makes (before that step's record is written) until
# the file GO exists; it writes its PID into READY when it pauses.
PAUSED = r"""
import os, sys, time
from pathlib import Path
import llama.trainer as trainer
from llama.cli import train

go, ready = Path(sys.argv[1]), Path(sys.argv[2])
train_step, paused = trainer.Trainer.train_step, []

def pause_after_the_first_step(self):
    result = train_step(self)
    if not paused:
        paused.append(1)
        ready.write_text(str(os.getpid()))
        while not go.exists():
            time.sleep(0.05)
    return result

trainer.Trainer.train_step = pause_after_the_first_step
sys.exit(train.main(sys.argv[3:]))
"""


def start_paused(world, out, tmp_path, *extra):
    """A train.py run on `out`, started and paused after its first step: (the process, its GO file)."""
    go, ready = tmp_path / "go", tmp_path / "ready"
    go.unlink(missing_ok=True)
    ready.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, "-c", PAUSED, str(go), str(ready),
                                *train_args(world, out, "--max-steps", "4", "--eval-every", "0", *extra)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(2400):
        if ready.exists() or process.poll() is not None:
            break
        subprocess.run(["sleep", "0.05"])
    assert ready.exists(), process.communicate()[1]
    return process, go


def folder_bytes_by_name(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(Path(folder).rglob("*"))}


# Holds a run folder's lock as a run does (llama/files.py's RunLock: an flock on FOLDER/.llama.lock, which holds the
# PID), without training: a stand-in for a run that is under way, started in a fraction of a second.
HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".llama.lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"{os.getpid()}\n".encode())
print("locked", flush=True)
time.sleep(600)
"""


def in_use(out, pid) -> str:
    return (f"error: {out} is in use by another run (process {pid}, which holds {out / LOCK_FILE}); wait for it to "
            "end or stop it, or choose another --out\n")


def assert_refused_as_in_use(tiny_world, out, pid, capsys, max_steps: str) -> None:
    """While process `pid` holds `out`: train.py (a new run and --resume) and finetune.py on it each exit 2
    with the one line naming that process, and change nothing."""
    before = folder_bytes_by_name(out)
    for main, args in ((train.main, train_args(tiny_world, out, "--max-steps", max_steps)),
                       (train.main, train_args(tiny_world, out, "--max-steps", max_steps, "--resume")),
                       (finetune.main, ["--model", str(tiny_world / "model"), "--dataset",
                                        str(tiny_world / "sft.jsonl"), "--out", str(out), "--max-steps", "1"])):
        capsys.readouterr()
        assert main(args) == 2
        assert capsys.readouterr().err == in_use(out, pid)
        assert folder_bytes_by_name(out) == before


def test_a_run_folder_in_use_is_refused_in_one_line_and_a_dead_runs_lock_is_taken_over(tiny_world, tmp_path, capsys):
    """While a process holds a run folder, train.py (a new run, --resume) and finetune.py on it are refused in
    one line naming that process, before they read anything, and change nothing; once it is killed, its lock
    is taken over."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert_refused_as_in_use(tiny_world, out, holder.pid, capsys, "2")
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_FILE).read_text() == f"{holder.pid}\n"  # a dead process's lock
    assert train.main(train_args(tiny_world, out, "--max-steps", "2", "--eval-every", "0")) == 0
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2] and not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_is_refused_and_a_dead_runs_lock_taken_over(tiny_world, tmp_path, capsys):
    """Two runs on one --out at once (two new runs, two --resume, train.py and finetune.py) wrote into one
    folder and interleaved their metrics. The first holds a lock; each other one is refused in one line that
    names its process and changes nothing; once it is killed, the next run takes its lock over."""
    out = tmp_path / "run"
    first, go = start_paused(tiny_world, out, tmp_path)
    assert_refused_as_in_use(tiny_world, out, first.pid, capsys, "4")
    go.write_text("")
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 4]  # one run's records, each once
    assert not (out / LOCK_FILE).exists()

    # two --resume at once; then the first is killed holding its lock, and the next run takes it over
    resumed, _ = start_paused(tiny_world, out, tmp_path, "--max-steps", "8", "--resume")
    capsys.readouterr()
    assert train.main(train_args(tiny_world, out, "--max-steps", "8", "--resume")) == 2
    assert capsys.readouterr().err == in_use(out, resumed.pid)
    resumed.kill()
    resumed.wait()
    assert (out / LOCK_FILE).read_text() == f"{resumed.pid}\n"  # left by the killed run, its process gone
    assert train.main(train_args(tiny_world, out, "--max-steps", "8", "--resume")) == 0
    assert [r["step"] for r in records(out) if "loss" in r] == list(range(1, 9))
    assert not (out / LOCK_FILE).exists()

"""train.py end to end on a tiny corpus: exact resume, atomic checkpoints, DDP, bad input."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llama import Llama, LlamaConfig, load_pretrained
from llama.batch import Batch
from llama.checkpoint import latest_checkpoint, load_training_checkpoint
from llama.cli import train
from llama.data import prepare
from llama.plot import running_mean

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a fox dog cat bird runs jumps sleeps eats over under near big small red green quick lazy".split()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    generator = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (40,), generator=generator)) + "."
            for _ in range(300)]
    (folder / "corpus.txt").write_text("\n\n".join(docs))
    prepare(str(folder / "corpus.txt"), folder / "shards", vocab_size=300, val_docs=20)
    return folder / "shards"


def args(shards, out, *extra):
    return ["--data", str(shards), "--out", str(out), "--preset", "tiny", "--batch-size", "4", "--seq-len", "32",
            "--max-steps", "12", "--warmup-steps", "2", "--lr", "3e-3", "--eval-every", "6", "--eval-tokens", "256",
            "--save-every", "4", "--sample-prompt", "the fox", *extra]


def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def run_script(*argv, **kwargs):
    """Run a script to its end; after 300 s stop it with every process it started (torchrun's workers)."""
    process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert train.main(args(shards, out)) == 0
    return out


def test_a_run_writes_metrics_checkpoints_and_a_plot(straight):
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evaluations = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all({"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(r) for r in steps)
    assert [r["step"] for r in evaluations] == [0, 6, 12]
    assert all(r["val_ppl"] == pytest.approx(2.718281828 ** r["val_loss"]) and "sample" in r for r in evaluations)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert sorted(p.name for p in straight.glob("step_*")) == ["step_0000004", "step_0000008", "step_0000012"]
    assert (straight / "latest").read_text().strip() == "step_0000012"
    model, tokenizer = load_pretrained(straight)  # a run folder loads as its latest checkpoint
    assert isinstance(model, Llama) and tokenizer.eot_id is not None
    result = run_script("-m", "llama.plot", str(straight))
    assert result.returncode == 0 and (straight / "loss.png").stat().st_size > 10_000


def test_the_plot_names_the_run_and_tells_training_from_validation(straight, tmp_path):
    from conftest import plotted_axes

    [panel] = plotted_axes([straight], tmp_path / "loss.png")
    assert (panel["title"], panel["ylabel"], panel["fractional_ticks"]) == (
        f"loss: {straight.name}", "loss (nats per token)", [])
    train, validation = (next(c for label, c in panel["colors"].items() if label.startswith(f"{straight.name} {kind}"))
                         for kind in ("train", "validation"))
    assert train != validation


def test_the_plot_smooths_a_long_training_curve_by_its_running_mean():
    values = [float(v * v % 7) for v in range(120)]
    assert running_mean(values, 6) == pytest.approx([sum(values[i:i + 6]) / 6 for i in range(115)])
    assert running_mean(values, 1) == values


def test_keep_last_prunes_old_checkpoints(shards, tmp_path):
    assert train.main(args(shards, tmp_path / "run", "--keep-last", "1", "--eval-every", "0")) == 0
    assert [p.name for p in (tmp_path / "run").glob("step_*")] == ["step_0000012"]


def wait_for_step(run, step, process):
    metrics = Path(run) / "metrics.jsonl"
    while process.poll() is None:
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step and "loss" in line
                                    for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.01)


@pytest.mark.parametrize("kill", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_resume_after_a_stop_gives_bitwise_the_same_losses(shards, straight, tmp_path, kill):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "train.py", *args(shards, out, "--lr", "3e-3")], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(out, 5, process)
    process.send_signal(kill)
    _, stderr = process.communicate(timeout=120)
    stopped_at = int(latest_checkpoint(out).name.split("_")[1])
    assert stopped_at < 12, "the run finished before it could be stopped"
    if kill == signal.SIGINT:  # Ctrl-C saves the step it was on, then exits cleanly
        assert process.returncode == 0 and f"interrupted: saving step {stopped_at}" in stderr
        assert stopped_at >= 5
    assert train.main(args(shards, out, "--resume")) == 0
    assert losses(out) == losses(straight)  # every step, bit for bit


def test_checkpoint_killed_mid_write_leaves_the_previous_one_loadable(shards, tmp_path):
    out = tmp_path / "run"
    assert train.main(args(shards, out, "--max-steps", "4")) == 0
    script = f"""
import sys, time
import llama.checkpoint as checkpoint
original = checkpoint.save_tensors
def slow_save(tensors, path):
    original(tensors, path)
    open({str(tmp_path / "writing")!r}, "w").close()
    time.sleep(60)
checkpoint.save_tensors = slow_save
from llama.cli import train
sys.exit(train.main(sys.argv[1:]))
"""
    process = subprocess.Popen([sys.executable, "-c", script, *args(shards, out, "--resume", "--max-steps", "8")],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not (tmp_path / "writing").exists():
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    process.kill()
    process.wait()
    assert latest_checkpoint(out).name == "step_0000004"
    assert load_training_checkpoint(latest_checkpoint(out)).state["step"] == 4
    load_pretrained(out)
    assert train.main(args(shards, out, "--resume", "--max-steps", "8")) == 0  # and the run goes on


def test_ddp_with_two_processes_matches_one_process_with_the_global_batch(shards, tmp_path):
    common = ["--data", str(shards), "--preset", "tiny", "--seq-len", "32", "--max-steps", "4", "--warmup-steps",
              "1", "--eval-every", "0", "--save-every", "0", "--sample-prompt", ""]
    single = run_script("train.py", *common, "--batch-size", "4", "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "train.py",
                     *common, "--batch-size", "2", "--out", str(tmp_path / "ddp"), env=env)
    assert ddp.returncode == 0, ddp.stderr
    one, two = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert one.keys() == two.keys() == {1, 2, 3, 4}
    assert all(abs(one[s] - two[s]) <= 1e-5 for s in one), (one, two)


# --- bad input -------------------------------------------------------------------------------------

def test_resume_with_other_settings_is_refused(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(args(shards, out, "--max-steps", "2")) == 0
    assert train.main(args(shards, out, "--max-steps", "4")) == 2
    assert (f"error: {out} already holds a run (latest, metrics.jsonl, step_0000002); pass --resume to continue a "
            "run, or choose a new or empty --out") in capsys.readouterr().err
    assert train.main(args(shards, out, "--resume", "--lr", "1e-3")) == 2
    assert "it was made with other settings (lr: 0.003 -> 0.001)" in capsys.readouterr().err


def test_shards_that_do_not_fit_the_model(shards, tmp_path, capsys):
    bad = tmp_path / "shards"
    bad.mkdir()
    for file in shards.iterdir():
        (bad / file.name).write_bytes(file.read_bytes())
    meta = json.loads((bad / "meta.json").read_text())
    (bad / "meta.json").write_text(json.dumps({**meta, "vocab_size": 70000}))
    assert train.main(args(bad, tmp_path / "run")) == 2
    assert "use a vocabulary of 70000 tokens, more than the model's vocab_size=300" in capsys.readouterr().err


def test_unwritable_out_and_full_disk_keep_the_last_checkpoint(shards, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert train.main(args(shards, blocker / "run")) == 2
    assert capsys.readouterr().err == (f"error: cannot write the run folder {blocker / 'run'}: Not a directory; "
                                       "choose a writable --out\n")
    out = tmp_path / "run"
    assert train.main(args(shards, out, "--max-steps", "4")) == 0

    def full_disk(tensors, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("llama.checkpoint.save_tensors", full_disk)
    assert train.main(args(shards, out, "--resume", "--max-steps", "8")) == 2
    assert re.search(rf"error: no space left in {re.escape(str(out))} to write step_0000008/: it needs about "
                     r"[0-9.]+ MB and [0-9.]+ [KMG]B are free; free some space there, then rerun with --resume: it "
                     r"continues from step_0000004, the last checkpoint, which is intact\n$", capsys.readouterr().err)
    assert latest_checkpoint(out).name == "step_0000004" and not list(out.glob(".step_*"))
    monkeypatch.undo()
    load_pretrained(out)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shards, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    original = Llama.loss
    calls = []

    def loss_that_breaks(self, *a, **k):
        calls.extend([1] if self.training else [])
        value = original(self, *a, **k)
        return value * float("nan") if len(calls) > 6 else value

    monkeypatch.setattr(Llama, "loss", loss_that_breaks)
    assert train.main(args(shards, out, "--eval-every", "0")) == 1
    assert "stopped: the loss became nan at step 7; stopping without saving" in capsys.readouterr().err
    assert latest_checkpoint(out).name == "step_0000004"


def test_a_diverging_run_stops_before_it_saves_a_broken_checkpoint(shards, tmp_path, capsys):
    """lr 1e6 makes the gradients NaN within a few steps. That step's update is skipped, the run stops with
    exit code 1 before it evaluates or saves again (once, the evaluation's sampling crashed on NaN logits,
    and without a sample prompt a NaN checkpoint replaced the last good one), and the checkpoint kept is
    the last good step's."""
    out = tmp_path / "run"
    code = train.main(args(shards, out, "--lr", "1e6", "--warmup-steps", "0", "--save-every", "1", "--keep-last", "1",
                           "--eval-every", "1"))
    err = capsys.readouterr().err
    assert code == 1, err
    stop = re.search(r"stopped: the (loss|gradient norm|validation loss) became (nan|inf) at step (\d+); stopping "
                     rf"without saving, the last good checkpoint in {re.escape(str(out))} is intact", err)
    assert stop, err
    bad_step = int(stop.group(3))
    kept = latest_checkpoint(out)
    assert [p.name for p in out.glob("step_*")] == [kept.name] and int(kept.name.split("_")[1]) == bad_step - 1
    saved = load_training_checkpoint(kept)
    assert all(torch.isfinite(weight).all() for weight in saved.weights.values())
    assert all(math.isfinite(r.get("val_loss", 0)) and math.isfinite(r.get("loss", 0))
               for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))


def test_a_step_with_a_nan_gradient_changes_no_weight(tmp_path, monkeypatch):
    """The skip is decided on the device (fused AdamW's found_inf): parameters, moments and step count stay."""
    from llama import Tokenizer
    from llama.trainer import TrainConfig, Trainer

    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    batch = Batch(ids[:, :-1], ids[:, 1:], torch.ones(2, 16, dtype=torch.bool))
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=300))
    trainer = Trainer(model, Tokenizer.train(["a b c"] * 10, vocab_size=300), FixedBatches([batch] * 3), None,
                      TrainConfig(max_steps=3), tmp_path, {}, device=torch.device("cpu"))
    trainer.train_step()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    moments = {name: trainer.optimizer.state[p]["exp_avg"].clone() for name, p in model.named_parameters()}
    original = Llama.loss
    monkeypatch.setattr(Llama, "loss", lambda self, *a, **k: original(self, *a, **k) * float("nan"))
    stats = trainer.train_step()
    assert math.isnan(float(stats["loss"])) and math.isnan(float(stats["grad_norm"]))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and torch.equal(trainer.optimizer.state[p]["exp_avg"], moments[name])
        assert float(trainer.optimizer.state[p]["step"]) == 1
    monkeypatch.undo()
    trainer.train_step()  # and a good step after it updates as usual
    assert not torch.equal(model.embed_tokens.weight, before["embed_tokens.weight"])
    assert float(trainer.optimizer.state[model.embed_tokens.weight]["step"]) == 2


class CountReads(TorchDispatchMode):
    """Counts aten._local_scalar_dense, the op behind .item(), int(tensor) and float(tensor): on a GPU, a
    wait for the device."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_the_training_step_reads_nothing_back_from_the_device(shards, tmp_path):
    """No .item() in the hot path: the loss, gradient norm and token counts stay on the device and are read
    back in one copy every --log-every steps. The reads in a whole run (its final save included) do not
    grow with the number of steps, whatever log_every is."""
    from llama import Tokenizer
    from llama.data import PretrainLoader, TokenShards
    from llama.trainer import TrainConfig, Trainer

    def reads(steps, log_every):
        data = TokenShards(shards)
        tokenizer = Tokenizer.load(data.tokenizer_file)
        torch.manual_seed(0)
        model = Llama(LlamaConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size))
        out = tmp_path / f"{steps}-{log_every}"
        trainer = Trainer(model, tokenizer, PretrainLoader(data, 4, 32), None,
                          TrainConfig(max_steps=steps, log_every=log_every), out, {}, device=torch.device("cpu"))
        with CountReads() as counter:
            trainer.fit()
        assert len(losses(out)) == steps
        return counter.reads

    assert reads(2, 2) == reads(6, 6) == reads(6, 1)
    with CountReads() as counter:  # the counter does see a read from a tensor
        Batch(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
              torch.ones(1, 2, dtype=torch.bool)).num_counted
    assert counter.reads == 1


def test_fsdp_matches_one_process_and_resumes(shards, straight, tmp_path):
    common = ["--data", str(shards), "--preset", "tiny", "--seq-len", "32", "--max-steps", "4", "--warmup-steps",
              "1", "--eval-every", "0", "--save-every", "2", "--sample-prompt", ""]
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518", "train.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    fsdp = tmp_path / "fsdp"
    result = run_script(*torchrun, *common, "--batch-size", "2", "--fsdp", "--out", str(fsdp), env=env)
    assert result.returncode == 0, result.stderr
    single = tmp_path / "single"
    assert train.main([*common, "--batch-size", "4", "--out", str(single)]) == 0
    one, sharded = losses(single), losses(fsdp)
    assert one.keys() == sharded.keys() and all(abs(one[s] - sharded[s]) <= 1e-5 for s in one), (one, sharded)
    # go back to step 2, as after a crash there, and redo steps 3 and 4 from the sharded checkpoint
    (fsdp / "latest").write_text("step_0000002\n")
    result = run_script(*torchrun, *common, "--batch-size", "2", "--fsdp", "--out", str(fsdp), "--resume", env=env)
    assert result.returncode == 0, result.stderr
    assert losses(fsdp) == sharded


class FixedBatches:
    """A stand-in loader that yields the given batches in order."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def __next__(self):
        self.position += 1
        return self.batches[self.position - 1]

    def state_dict(self):
        return {"position": self.position}


def test_accumulation_weighs_every_counted_token_equally(tmp_path):
    """Two micro-batches with different numbers of counted tokens step exactly like one big batch."""
    from llama import Tokenizer
    from llama.trainer import TrainConfig, Trainer

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (4, 17), generator=generator)
    mask = torch.ones(4, 16, dtype=torch.bool)
    mask[:2, 10:] = False  # the first micro-batch counts 10 + 10 tokens, the second 16 + 16
    whole = Batch(ids[:, :-1], ids[:, 1:], mask)
    halves = [Batch(ids[:2, :-1], ids[:2, 1:], mask[:2]), Batch(ids[2:, :-1], ids[2:, 1:], mask[2:])]
    tokenizer = Tokenizer.train(["a b c"] * 10, vocab_size=300)
    results = []
    for batches, accumulation in (([whole], 1), (halves, 2)):
        torch.manual_seed(0)
        model = Llama(LlamaConfig.from_preset("tiny"))
        trainer = Trainer(model, tokenizer, FixedBatches(batches), None,
                          TrainConfig(max_steps=1, grad_accum=accumulation), tmp_path, {}, device=torch.device("cpu"))
        stats = trainer.train_step()
        results.append((stats["loss"], stats["counted"], [p.detach().clone() for p in model.parameters()]))
    (loss_one, counted_one, params_one), (loss_two, counted_two, params_two) = results
    assert float(counted_one) == float(counted_two) == 52
    assert float(loss_one) == pytest.approx(float(loss_two), abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(params_one, params_two))

"""Hostile inputs and faults (docs/training.md "Threat model"): checkpoints that would run code,
damaged checkpoints, hung ranks, signals to the launcher, bad samples, converter inputs that point
outside their folder, and config values that would fail late. One test (or more) per class."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from helpers import ROOT, finish, free_port, one_rank, wait_for

from iais_scale import checkpoint as ckpt
from iais_scale.config import ConfigError, load_config
from iais_scale.data import format as fmt
from iais_scale.data.image_fields import RegionFields
from iais_scale.data.samples import BadSample, decode_sample
from iais_scale.data.shards import resolve_split
from iais_scale.engine import check_inputs

MARKER = Path("/tmp/iais_scale_hostile_payload_ran")


class _Payload:
    def __reduce__(self):
        return (Path.touch, (MARKER,))


def single_rank(*args: str) -> tuple[int, str]:
    """``launchers/train.py`` as a 1-rank job without the DeepSpeed launcher, run to its end:
    (exit code, output)."""
    return finish(one_rank(*args))


def tiny(demo: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [f"data.root={demo}", "data.make_demo=false", "data.swap_split=null", f"train.output_dir={out}",
            f"train.steps={steps}", "train.log_every=1", "train.micro_batch_size=8", "train.checkpoint_every=2",
            "objectives.mlm_only_steps=0", "objectives.num_candidates=4", "objectives.num_hard=2",
            "eval.max_images=4", *extra]


@pytest.fixture(scope="module")
def trained_run(tiny_demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "run"
    code, log = single_rank(*tiny(tiny_demo, out, 4))
    assert code == 0, log[-6000:]
    assert ckpt.complete_checkpoints(out / "checkpoints") and (out / "checkpoints/step4/COMPLETE").is_file()
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def plant(path: Path) -> None:
    """Replace a DeepSpeed file by a pickle that runs code, and record it in COMPLETE as a checkpoint
    received from elsewhere would (matching size and checksum)."""
    torch.save({"module": {}, "x": _Payload()}, path)
    folder = path.parent
    marker = json.loads((folder / "COMPLETE").read_text())
    marker["files"].update(ckpt.file_records(folder, [path.name]))
    (folder / "COMPLETE").write_text(json.dumps(marker))


# --------------------------------------------------------------------------- code execution


@pytest.mark.slow
@pytest.mark.parametrize("target", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_planted_pickles_never_run_on_resume_evaluate_or_export(trained_run, tiny_demo, tmp_path, target):
    MARKER.unlink(missing_ok=True)
    run = copy_run(trained_run, tmp_path)
    step4 = run / "checkpoints" / "step4"
    plant(step4 / target)
    assert not ckpt.verify(step4)  # sizes and checksums agree: only the pickle check stands between
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.check_pickles(step4)

    # Named explicitly: refused before DeepSpeed touches it. Automatic: the previous checkpoint.
    code, log = single_rank(*tiny(tiny_demo, run, 6), "--resume", str(step4))
    assert code != 0 and "refused" in log, log[-3000:]
    code, log = single_rank(*tiny(tiny_demo, run, 3), "--resume", "auto")  # (3 steps: step4 stays as planted)
    assert code == 0, log[-3000:]
    assert f"checkpoint {step4} is damaged" in log and "resumed from step 2 " in log, log[-4000:]

    spec = importlib.util.spec_from_file_location("evaluate_launcher", ROOT / "launchers" / "evaluate.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    assert launcher.main(["--checkpoint", str(step4), "--data", str(tiny_demo), "--swap-split", "none"]) == 2
    assert ckpt.main(["export", str(step4), str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf").exists()
    assert not MARKER.exists(), "a planted pickle ran"


def plant_in_folder(folder: Path) -> Path:
    """A code-running pickle as one more recorded file of ``folder`` (``COMPLETE`` rewritten to match)."""
    target = next(folder.rglob("*.pt"))
    plant_at = target.with_name("planted.pt")
    torch.save({"x": _Payload()}, plant_at)
    marker = json.loads((folder / "COMPLETE").read_text())
    marker["files"].update(ckpt.file_records(folder, [str(plant_at.relative_to(folder))]))
    (folder / "COMPLETE").write_text(json.dumps(marker))
    return plant_at


@pytest.mark.slow
def test_a_planted_pickle_in_the_universal_folder_never_runs(trained_run, tiny_demo, tmp_path):
    """Resuming on another ZeRO stage converts step4 once into step4_universal (reused later, not
    reconverted); a pickle planted there afterwards is refused before DeepSpeed loads the folder."""
    MARKER.unlink(missing_ok=True)
    run = copy_run(trained_run, tmp_path)
    zero1 = "train.deepspeed_config=configs/deepspeed/zero1.json"
    code, log = single_rank(*tiny(tiny_demo, run, 5), "--resume", "auto", zero1, "train.checkpoint_every=0")
    assert code == 0 and "resumed from step 4 " in log, log[-3000:]
    universal = run / "checkpoints" / "step4_universal"
    assert not ckpt.verify(universal), ckpt.verify(universal)  # a genuine one passes its integrity check
    made = (universal / "COMPLETE").stat().st_ino
    code, log = single_rank(*tiny(tiny_demo, run, 5), "--resume", str(run / "checkpoints" / "step4"), zero1,
                            "train.checkpoint_every=0", "train.output_dir=" + str(run))
    assert code == 0, log[-3000:]
    assert (universal / "COMPLETE").stat().st_ino == made  # reused, not converted again
    plant_in_folder(universal)
    code, log = single_rank(*tiny(tiny_demo, run, 5), "--resume", str(run / "checkpoints" / "step4"), zero1)
    assert code == 2 and "refused" in log and "planted.pt" in log, log[-3000:]
    assert not MARKER.exists(), "a planted pickle ran"


@pytest.mark.slow
def test_a_planted_pickle_in_best_never_runs(tiny_demo, tmp_path):
    """The best checkpoint is loaded at the end of a run: a pickle planted there is refused, and the
    run reports its final step instead."""
    MARKER.unlink(missing_ok=True)
    run = tmp_path / "run"
    selecting = ("data.val_split=val", "train.eval_every=2")
    code, log = single_rank(*tiny(tiny_demo, run, 4, *selecting))
    assert code == 0 and (run / "checkpoints" / "best" / "COMPLETE").is_file(), log[-3000:]
    plant_in_folder(run / "checkpoints" / "best")
    code, log = single_rank(*tiny(tiny_demo, run, 6, "data.val_split=val", "train.eval_every=0"), "--resume", "auto")
    assert code == 0, log[-3000:]
    assert "checkpoint " + str(run / "checkpoints" / "best") + " is damaged" in log, log[-3000:]
    assert "reporting the final step 6 instead of the damaged best checkpoint" in log
    assert "selected_by" not in json.loads((run / "eval.json").read_text())
    assert not MARKER.exists(), "a planted pickle ran"


@pytest.mark.slow
def test_a_second_run_into_a_run_folder_is_refused_and_changes_nothing(trained_run, tmp_path):
    """Without --resume, a run folder holding another run (or files of the user's) is refused before
    anything is written; the message names --resume auto and a new train.output_dir."""
    run = copy_run(trained_run, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    code, log = single_rank(*tiny(trained_run.parent, run, 6))  # (the data are never reached)
    assert code == 2, log[-3000:]
    assert f"train.output_dir: {run} holds another run" in log and "--resume auto" in log, log[-3000:]
    assert "new train.output_dir" in log
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    code, log = single_rank(*tiny(trained_run.parent, mine, 6))
    assert code == 2 and "holds files that are not a run's (notes.txt)" in log, log[-3000:]
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_an_explicit_resume_of_a_damaged_checkpoint_is_refused(trained_run, tiny_demo, tmp_path):
    run = copy_run(trained_run, tmp_path)
    step4 = run / "checkpoints" / "step4"
    optim = next(step4.glob("*optim_states.pt"))
    os.truncate(optim, optim.stat().st_size // 2)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    code, log = single_rank(*tiny(tiny_demo, run, 6), "--resume", str(step4))
    assert code == 2, log[-3000:]
    assert f"--resume {step4}: refused, the checkpoint is damaged" in log, log[-3000:]
    assert f"The newest intact checkpoint beside it is {run / 'checkpoints' / 'step2'}" in log, log[-3000:]
    assert "starting from scratch" not in log
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # hf_model/, eval.json untouched


def test_export_writes_only_into_an_empty_folder_or_its_own_earlier_export(trained_run, tmp_path, capsys):
    run = copy_run(trained_run, tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert ckpt.main(["export", str(run), str(mine)]) == 2
    assert "holds no earlier export (notes.txt)" in capsys.readouterr().out
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert ckpt.main(["export", str(run), str(run)]) == 2  # the run into itself
    assert "holds the checkpoint being exported" in capsys.readouterr().out
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    out = tmp_path / "hf"
    assert ckpt.main(["export", str(run), str(out)]) == 0
    assert ckpt.main(["export", str(run), str(out)]) == 0  # its own earlier export is replaced
    assert ckpt.is_hf_folder(out)
    (out / "README.md").write_text("my model card")
    assert ckpt.main(["export", str(run), str(out)]) == 2  # ... unless the user added to it
    assert "holds files an export did not write (README.md)" in capsys.readouterr().out
    assert (out / "README.md").read_text() == "my model card"


def plant_tokenizer_code(folder: Path) -> None:
    """A tokenizer that names a Python class of its own (``auto_map``): importing it would run code."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenization_evil.py").write_text(f"from pathlib import Path\nPath({str(MARKER)!r}).touch()\n"
                                                 "class EvilTokenizer:\n    pass\n")


@pytest.mark.slow
def test_a_tokenizer_with_code_of_its_own_is_refused_even_when_the_user_says_yes(trained_run, tiny_demo, tmp_path):
    """transformers asks "run custom code? [y/N]" for such a tokenizer; a "y" on standard input must
    not run it: an HF folder handed to evaluate.py, and a data set's tokenizer/ for training."""
    MARKER.unlink(missing_ok=True)
    hf = tmp_path / "hf"
    assert ckpt.main(["export", str(trained_run), str(hf)]) == 0
    plant_tokenizer_code(hf)
    proc = subprocess.run([sys.executable, "launchers/evaluate.py", "--checkpoint", str(hf), "--data", str(tiny_demo),
                           "--swap-split", "none"], cwd=ROOT, input="y\ny\n", capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "never runs code from its inputs" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert not MARKER.exists(), "the tokenizer's code ran"

    data = Path(shutil.copytree(tiny_demo, tmp_path / "data"))
    plant_tokenizer_code(data / "tokenizer")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "launchers/train.py", "--config", "configs/demo.yaml",
                           *tiny(data, tmp_path / "run", 2)], cwd=ROOT, input="y\ny\n", capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "never runs code from its inputs" in proc.stderr, proc.stderr[-3000:]
    assert not MARKER.exists(), "the tokenizer's code ran"


def test_trainer_state_is_not_a_pickle(trained_run):
    """Each rank's own state is safetensors + JSON: readable with no unpickling at all."""
    scalars, tensors = ckpt.read_state(ckpt.state_file(trained_run / "checkpoints" / "step4", 0))
    assert scalars["step"] == 4 and tensors["rng.torch"].dtype == torch.uint8
    with open(ckpt.state_file(trained_run / "checkpoints" / "step4", 0), "rb") as f:
        assert b"\x80\x02" not in f.read(16)  # not a pickle stream


# --------------------------------------------------------------------------- damaged checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate_optimizer", "missing_rank_state"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(trained_run, tiny_demo, tmp_path, damage):
    run = copy_run(trained_run, tmp_path)
    step4 = run / "checkpoints" / "step4"
    if damage == "truncate_optimizer":
        optim = next(step4.glob("*optim_states.pt"))
        os.truncate(optim, optim.stat().st_size // 2)
    else:
        ckpt.state_file(step4, 0).unlink()
    assert ckpt.verify(step4)
    code, log = single_rank(*tiny(tiny_demo, run, 6), "--resume", "auto")
    assert code == 0, log[-3000:]
    assert f"checkpoint {step4} is damaged" in log and "resumed from step 2 " in log, log[-4000:]
    assert "resumed from step 4" not in log
    steps = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps[-2:] == [5, 6]


# --------------------------------------------------------------------------- hangs and signals


def launch(demo: Path, out: Path, *extra: str, ranks: int = 2, script: str = "launchers/train.py",
           env: dict | None = None) -> subprocess.Popen:
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), script,
           "--config", "configs/demo.yaml", *tiny(demo, out, 400, "train.checkpoint_every=0", *extra)]
    # As a terminal's foreground job: SIGINT at its default (a job started in the background by a
    # non-interactive shell, as CI may be, inherits it ignored, and Ctrl-C would not reach the runner).
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def ranks_of(out: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "launchers/train.py" in cmd and f"train.output_dir={out}" in cmd and "--local_rank" in cmd:
            found.append(p)
    return found


@pytest.mark.slow
def test_a_hung_rank_is_reported_and_the_job_exits(tiny_demo, tmp_path):
    """A shard that never delivers a byte (a FIFO nobody writes) stalls one rank while the other waits
    in a collective: the watchdog names the stage, dumps the stacks and the job exits non-zero."""
    split = tmp_path / "data" / "train"
    shutil.copytree(tiny_demo, tmp_path / "data", dirs_exist_ok=True)
    stalled = split / "shard-000001.tar"
    stalled.unlink()
    os.mkfifo(stalled)
    proc = launch(tmp_path / "data", tmp_path / "run", "train.watchdog_s=6", "train.dist_timeout_s=900")
    try:
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, log[-3000:]
    assert "no progress for" in log and "exiting with code 124" in log, log[-4000:]
    assert "Thread" in log or "Current thread" in log  # the stacks


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_and_leaves_no_orphans(tiny_demo, tmp_path):
    out = tmp_path / "run"
    proc = launch(tiny_demo, out)
    wait_for(out / "train_log.jsonl", proc)
    os.kill(proc.pid, signal.SIGTERM)  # `kill RUNNER`: only the deepspeed runner gets it
    deadline = time.time() + 120
    while ranks_of(out) and time.time() < deadline:
        time.sleep(0.5)
    assert not ranks_of(out), "ranks kept training after their launcher died"
    saved = ckpt.complete_checkpoints(out / "checkpoints")
    assert saved and 0 < saved[-1][0] < 400, saved
    proc.wait(timeout=60)
    log = proc.stdout.read()
    assert "is gone; stopping after this step" in log, log[-3000:]


@pytest.mark.slow
def test_sigterm_to_the_launcher_during_start_up_stops_the_ranks(tiny_demo, tmp_path):
    """``kill RUNNER`` while the ranks start up (their model is built, no step has run): they notice
    and stop at their first agreement point instead of training to the last step."""
    import threading

    out = tmp_path / "run"
    proc = launch(tiny_demo, out)
    said: list[str] = []  # the ranks keep the runner's pipe: drained, or a full pipe would block them
    threading.Thread(target=lambda: said.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.time() + 300
        while not any(" INFO model: " in line for line in said) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        parents = [(r.pid, [(p.pid, " ".join(p.cmdline())[:80]) for p in r.parents()[:3]]) for r in ranks_of(out)]
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.time() + 180
        while ranks_of(out) and time.time() < deadline:
            time.sleep(0.5)
        assert not ranks_of(out), ("ranks kept training after their launcher died during start-up", parents,
                                   "".join(said)[-3000:])
        log = out / "train_log.jsonl"
        steps = len(log.read_text().splitlines()) if log.is_file() else 0
        assert steps < 50, steps
    finally:
        for rank in ranks_of(out):  # never left running into the next test
            rank.kill()


@pytest.mark.slow
@pytest.mark.parametrize("first", ["ranks", "launcher"])
def test_ctrl_c_checkpoints_then_stops(first, tiny_demo, tmp_path):
    """Ctrl-C reaches the runner, DeepSpeed's launcher and the ranks at once; the launcher then
    SIGTERMs each rank's whole process tree, data workers included. Whichever reacts first, the ranks
    finish the step, save it and exit 143. "launcher": every step is made 1.5 s slower on the ranks'
    side (tests/slow_step_worker.py), so the launcher's SIGTERMs land while the ranks are mid-step."""
    out = tmp_path / "run"
    delay = {"ranks": "0", "launcher": "1.5"}[first]
    proc = launch(tiny_demo, out, "data.num_workers=1", script="tests/slow_step_worker.py",
                  env={"IAIS_TEST_STEP_DELAY_S": delay})
    wait_for(out / "train_log.jsonl", proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
    log, _ = proc.communicate(timeout=120)
    saved = ckpt.complete_checkpoints(out / "checkpoints")
    assert saved and 0 < saved[-1][0] < 400, log[-3000:]
    assert "got signal 2; stopping after this step" in log, log[-3000:]
    assert "saved; stopping (exit code 143)" in log, log[-3000:]
    assert proc.returncode == -signal.SIGINT, log[-3000:]  # the runner: Ctrl-C, as Python reports it (130)
    tracebacks = [b for b in log.split("Traceback")[1:] if "iais_scale" in b or "train.py" in b]
    assert not tracebacks, tracebacks[0][:2000]


# --------------------------------------------------------------------------- bad samples


def raw_sample(**members) -> dict:
    meta = {"image_id": "k", "split": "train", "width": 10, "height": 10, "captions": ["a red square"]}
    raw = {"__key__": "k", "json": fmt.encode_json(meta),
           "feat.npy": fmt.encode_npy(np.ones((2, 4), np.float32)),
           "boxes.npy": fmt.encode_npy(np.array([[0, 0, 5, 5], [1, 1, 9, 9]], np.float32))}
    raw.update(members)
    return raw


@pytest.mark.parametrize("members, reason", [
    ({"json": b"[" * 100_000 + b"]" * 100_000}, "bad_json"),  # RecursionError inside json
    ({"feat.npy": b"\x93NUMPY\x01\x00v\x00{'descr': '<c32', 'fortran_order': False, 'shape': (2, 4), }"
      + b" " * 50 + b"\n" + bytes(256)}, "bad_npy"),  # a dtype numpy does not know
    ({"feat.npy": fmt.encode_npy(np.ones((2, 7), np.float32))}, "bad_feature_dim"),
    ({"__too_large__": ["feat.npy"]}, "member_too_large"),
])
def test_one_bad_sample_is_a_counted_reason(members, reason):
    with pytest.raises(BadSample) as e:
        decode_sample(raw_sample(**members), RegionFields(feature_dim=4))
    assert e.value.reason == reason


def test_verify_and_stats_count_a_nested_json_instead_of_crashing(tmp_path, capsys):
    from data_tools.__main__ import main

    with fmt.ShardWriter(tmp_path / "d" / "train") as w:
        w.write("ok", {"image_id": "ok", "split": "train", "width": 10, "height": 10, "captions": ["a"]},
                feat=np.ones((1, 4), np.float32), boxes=np.array([[0, 0, 5, 5]], np.float32))
    shard = tmp_path / "d" / "train" / "shard-000000.tar"
    import tarfile

    with tarfile.open(shard, "a") as tf:  # an appended sample whose JSON nests 100,000 deep
        data = b"[" * 100_000 + b"]" * 100_000
        info = tarfile.TarInfo("deep.json")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (tmp_path / "d" / "train" / "sizes.json").write_text(json.dumps({"shard-000000.tar": 2}))
    assert main(["verify", str(tmp_path / "d" / "train")]) == 1
    assert "train/shard-000000.tar:deep: " in capsys.readouterr().out
    assert main(["stats", str(tmp_path / "d" / "train"), "--json"]) == 0


# --------------------------------------------------------------------------- silent wrong results


def test_sizes_json_cannot_point_outside_its_split(tmp_path):
    split = tmp_path / "train"
    split.mkdir()
    (split / "shard-000000.tar").write_bytes(b"")
    for sizes, message in (({"../test/shard-000000.tar": 3}, "invalid shard names"),
                           ({"/etc/passwd": 3}, "invalid shard names"),
                           ({"shard-000000.tar": -1}, "integers >= 0"),
                           ({"shard-000000.tar": "3"}, "integers >= 0")):
        (split / "sizes.json").write_text(json.dumps(sizes))
        with pytest.raises(ValueError, match=message):
            resolve_split(str(split))


def test_duplicate_samples_are_skipped_in_evaluation_sets(tiny_demo, tmp_path):
    from iais_scale.data.retrieval import read_split

    split = tmp_path / "test"
    shutil.copytree(tiny_demo / "test", split)
    shutil.copy(split / "shard-000000.tar", split / "shard-000001.tar")  # a shard copied twice
    sizes = json.loads((split / "sizes.json").read_text())
    (split / "sizes.json").write_text(json.dumps({**sizes, "shard-000001.tar": sizes["shard-000000.tar"]}))
    counts: Counter = Counter()
    samples = read_split(split, counts=counts)
    assert len(samples) == 16 and counts["duplicate_sample"] == 16


def test_verify_reports_images_shared_by_two_splits(tiny_demo, tmp_path, capsys):
    from data_tools.__main__ import main

    data = Path(shutil.copytree(tiny_demo, tmp_path / "d"))
    shutil.copy(data / "test" / "shard-000000.tar", data / "train" / "shard-000003.tar")  # test inside train
    sizes = json.loads((data / "train" / "sizes.json").read_text())
    (data / "train" / "sizes.json").write_text(json.dumps({**sizes, "shard-000003.tar": 16}))
    assert main(["verify", str(data)]) == 1
    assert "splits train and test share 16 image id(s)" in capsys.readouterr().out


def jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "JPEG")
    return buf.getvalue()


def test_converters_refuse_paths_outside_the_image_folder(tmp_path):
    from data_tools.__main__ import main

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg())
    (tmp_path / "secret.jpg").write_bytes(jpeg())
    entries = [{"filename": name, "split": "train", "sentences": [{"raw": "a photo"}]}
               for name in ("a.jpg", "../secret.jpg", str(tmp_path / "secret.jpg"), "nul\x00.jpg")]
    (tmp_path / "k.json").write_text(json.dumps({"images": entries}))
    assert main(["karpathy", "--json", str(tmp_path / "k.json"), "--images", str(images),
                 "--out", str(tmp_path / "out")]) == 0
    skipped = json.loads((tmp_path / "out" / "train" / "skipped.json").read_text())
    assert skipped["counts"] == {"bad_path": 3}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"] == {"train": 1}


def test_a_split_whose_every_input_failed_is_an_error(tmp_path, capsys):
    from data_tools.__main__ import main

    images = tmp_path / "images"
    images.mkdir()
    entries = [{"filename": f"{i}.jpg", "split": split, "sentences": [{"raw": text}]}
               for i, (split, text) in enumerate([("train", "a dog"), ("test", "  "), ("test", "\t")])]
    (images / "0.jpg").write_bytes(jpeg())
    (tmp_path / "k.json").write_text(json.dumps({"images": entries}))
    args = ["karpathy", "--json", str(tmp_path / "k.json"), "--images", str(images), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "split(s) ended empty: test" in err and "no_captions" in err
    assert json.loads((tmp_path / "o" / "test" / "skipped.json").read_text())["counts"] == {"no_captions": 2,
                                                                                          "empty_caption": 2}
    assert not (tmp_path / "o" / "manifest.json").exists()
    assert main([*args, "--allow-empty-splits"]) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["splits"] == {"train": 1, "test": 0}


def test_a_compressed_feature_bomb_is_refused_before_expansion(tmp_path):
    from data_tools.regions import load_regions

    path = tmp_path / "bomb.npz"
    buf = io.BytesIO()
    np.save(buf, np.zeros((4 << 20,), np.float32))  # 16 MB of zeros, a few KB compressed
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("features.npy", buf.getvalue())
        z.writestr("boxes.npy", buf.getvalue())
    assert path.stat().st_size < 200_000
    with pytest.raises(ValueError, match="declare"):
        load_regions(path, (10, 10), max_bytes=1 << 20)


# --------------------------------------------------------------------------- config holes


@pytest.mark.parametrize("override, field", [
    ("train.log_every=0", "train.log_every"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"),
    ("data.num_workers=-1", "data.num_workers"),
    ("objectives.iais.layers=[99]", "objectives.iais.layers"),
    ("eval.max_images=0", "eval.max_images"),
    ("train.deepspeed_config=README.md", "train.deepspeed_config"),
])
def test_config_holes_are_reported_up_front(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs/demo.yaml", [override])
    assert any(p.startswith(field) for p in e.value.problems), e.value.problems


def test_deepspeed_files_and_batch_sizes_are_checked_before_any_process_starts(tiny_demo, tmp_path):
    for content, message in (("[1, 2]", "must hold a JSON object"),
                             ('{"zero_optimization": {"stage": 9}}', "stage must be 0, 1, 2 or 3")):
        f = tmp_path / "ds.json"
        f.write_text(content)
        with pytest.raises(ConfigError, match=message):
            load_config(ROOT / "configs/demo.yaml", [f"train.deepspeed_config={f}"])
    cfg = load_config(ROOT / "configs/demo.yaml", [f"data.root={tiny_demo}", "data.make_demo=false",
                                                   "train.micro_batch_size=64"])
    problems = check_inputs(cfg, world=2)
    assert any("fewer than one micro-batch per rank" in p for p in problems), problems


def test_the_suites_shm_clean_up_leaves_a_live_runs_buffer(tmp_path):
    """tests/conftest.py removes DeepSpeed buffers left by the suite's killed runs, never one that a
    live process (a user's training run on the same machine) has mapped."""
    from conftest import remove_orphaned_shm

    path = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_test_{os.getpid()}_0"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import mmap, os, sys, time\n"
        f"fd = os.open({path!r}, os.O_CREAT | os.O_RDWR); os.ftruncate(fd, 4096)\n"
        "m = mmap.mmap(fd, 4096); os.close(fd); print('MAPPED', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "MAPPED"
        remove_orphaned_shm({path})
        assert os.path.exists(path), "a live process's buffer was removed"
    finally:
        holder.kill()
        holder.wait()
    remove_orphaned_shm({path})
    assert not os.path.exists(path)

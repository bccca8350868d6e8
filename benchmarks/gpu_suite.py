"""One prepared run of what only a GPU can show (issue 17): install, measure, one table, one JSON.

    bash benchmarks/gpu_suite.sh                 # on the GPU machine: ~8 minutes, JSON into $OUT
    bash benchmarks/gpu_suite.sh --dry           # here, on the CPU: the same code paths, tiny shapes
    python benchmarks/gpu_suite.py --dry --steps 1,5 --out /tmp/suite

Install (skipped with ``--dry`` or ``--skip-install``): reads the GPU with ``nvidia-smi`` (queries
only: the suite never resets, re-clocks or re-partitions the GPU); uses the CUDA build of torch that
is there, or tries to install one (``--wheelhouse``, then the PyTorch index for the driver's CUDA
version); installs the other missing packages from the wheelhouse (``benchmarks/gpu_wheels.sh``
builds it where PyPI is reachable; default ``.whl/``), then ``pip install -e .``, and prints how long
that took. Whatever cannot be installed is named and the suite stops there (exit status 3).

Steps (run in the order 1, 2, 5, 3, 4: the quick measurements first), each in its own subprocess
with its own time cap inside the suite's budget (``--budget-s``); a step stopped at its cap keeps
what it had printed (``RESULT {json}`` lines) and the suite prints the table so far:
  1 IAIS term: benchmarks/iais_term.py, batched vs per-sample loop (B=32 H=12 N=100 d=64, forward +
    backward), the model's static-bound path under ``torch.cuda.set_sync_debug_mode("error")``.
    Target >= 20x, no host sync.
  2 Model step: benchmarks/model_step.py, base and large in bf16 with SDPA, micro-batch filling
    memory, IAIS and activation checkpointing on/off, MFU against the dense bf16 peak (H200 SXM:
    989 TFLOP/s), and a bare BertModel. Targets: MFU >= 40% (large), IAIS <= 1.05x, framework
    step <= 1.10x the bare BertModel.
  3 The real launcher: ``deepspeed --num_gpus 1 launchers/train.py --config configs/demo.yaml`` with
    ZeRO-2 in bf16 and in fp16 (loss scaling), 300 steps: the report (eval.json) and the fp16 run's
    overflow steps (train_log.jsonl ``overflow_steps_total``, eval.json ``overflow_steps``).
  4 ZeRO-3 + CPU optimizer offload with the >1B model (``model.size=xl``), 5 steps: memory per
    GPU and step time from train_log.jsonl (the run is stopped after its last logged step: the
    1.3B checkpoint save and the evaluation are not what this step measures). DeepSpeed's CPU Adam
    op is compiled in the background from the start of the suite, so step 4 finds it built.
  5 Mining and evaluation: benchmarks/gpu_suite_steps.py (benchmarks/mining.py's functions: 399
    cross-encoder candidates vs the ITC shortlist; benchmarks/rerank.py's k: all pairs vs top-k
    re-ranking at 1K images x 5K captions).

``--dry``: the same steps on the CPU with tiny shapes (tiny model, few steps, ``deepspeed
--num_gpus 2`` CPU ranks with gloo); the JSON then says ``"device": "cpu", "dry": true`` and the
table is marked: its figures are no performance figures. Output: ``gpu_suite.json`` and
``gpu_suite.log`` (every subprocess's output) in ``--out`` (default ``$OUT``, else runs/gpu_suite[_dry]).
Exit status: 0 every step measured or skipped with a reason, 1 a step failed or hit its cap,
3 the install failed. docs/performance.md describes the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PY = sys.executable
STEP_NAMES = {
    "1": "IAIS term",
    "2": "model step + MFU",
    "3": "launcher ZeRO-2 bf16/fp16",
    "4": "ZeRO-3 offload, xl (>1B)",
    "5": "mining + evaluation",
}
ORDER = ("1", "2", "5", "3", "4")
# import name -> what to install (the project's runtime needs, and DeepSpeed's own).
REQUIRED = {
    "torch": "torch (a CUDA build)", "deepspeed": "deepspeed", "transformers": "transformers",
    "tokenizers": "tokenizers", "webdataset": "webdataset", "yaml": "pyyaml", "numpy": "numpy",
    "safetensors": "safetensors", "PIL": "pillow", "tqdm": "tqdm", "tensorboard": "tensorboard",
    "matplotlib": "matplotlib", "pyarrow": "pyarrow", "fsspec": "fsspec", "hjson": "hjson",
    "pydantic": "pydantic",
}
H200_PEAK_NOTE = "989 TFLOP/s dense bf16: the H200 SXM datasheet (no sparsity)"


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def results(text: str) -> list[dict]:
    """The ``RESULT {json}`` lines of a worker's output."""
    out = []
    for line in text.splitlines():
        if line.startswith("RESULT "):
            try:
                out.append(json.loads(line[len("RESULT "):]))
            except ValueError:
                pass
    return out


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def error_line(text: str) -> str:
    """The most telling line of a failed run's output: the last exception or error line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pat = re.compile(r"(Error|Exception|error:|Traceback|Killed|not supported|FAILED)", re.I)
    hits = [ln for ln in lines if pat.search(ln) and not ln.startswith("Traceback")]
    line = hits[-1] if hits else (lines[-1] if lines else "no output")
    return line[:400]


def fmt(x, spec: str = ".1f", none: str = "n/a") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


class Suite:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry
        self.device = "cpu" if self.dry else "cuda"
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s
        out = args.out or os.environ.get("OUT") or str(ROOT / "runs" / ("gpu_suite_dry" if self.dry else "gpu_suite"))
        out_path = Path(out)
        if out_path.suffix == ".json":
            self.json_path, self.out_dir = out_path, out_path.parent
        else:
            self.out_dir, self.json_path = out_path, out_path / "gpu_suite.json"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out_dir / "gpu_suite.log"
        self.log = open(self.log_path, "w")
        self.work = Path(args.work) if args.work else Path(
            tempfile.mkdtemp(prefix="iais_gpu_suite_dry_" if self.dry else "iais_gpu_suite_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(BENCH)] + (
            [self.env["PYTHONPATH"]] if self.env.get("PYTHONPATH") else []))
        self.env["PYTHONUNBUFFERED"] = "1"
        if self.dry:  # the CPU, even on a machine with a GPU: dry figures must never be GPU figures
            self.env["CUDA_VISIBLE_DEVICES"] = ""
            self.env["DS_ACCELERATOR"] = "cpu"
        self.child: subprocess.Popen | None = None
        self.selected = [s.strip() for s in args.steps.split(",") if s.strip()]
        unknown = [s for s in self.selected if s not in STEP_NAMES]
        if unknown:
            raise SystemExit(f"--steps: unknown step(s) {unknown}; the steps are {', '.join(STEP_NAMES)}")
        self.data = {
            "suite": "iais_scale benchmarks/gpu_suite.py", "issue": 17, "date": now_utc(),
            "dry": self.dry, "device": self.device,
            "note": ("dry run on the CPU with tiny shapes: checks the code paths, NOT performance figures"
                     if self.dry else "measured on the GPU named below"),
            "budget_s": args.budget_s, "steps_selected": self.selected, "install": None,
            "environment": {"python": sys.version.split()[0], "executable": PY},
            "steps": {s: {"name": STEP_NAMES[s], "status": "not run", "reason": "not reached yet"} for s in STEP_NAMES},
        }
        for s in STEP_NAMES:
            if s not in self.selected:
                self.data["steps"][s].update(status="skipped", reason="not selected (--steps)")

    # ------------------------------------------------------------------ plumbing

    def say(self, msg: str) -> None:
        line = f"[suite {time.monotonic() - self.t0:6.0f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, label: str, cmd: list[str], cap: float, *, stop_when=None, env=None) -> dict:
        """Run ``cmd`` in its own process group, at most ``cap`` seconds (and within the budget).
        ``stop_when()`` True ends it early on purpose. Returns rc, seconds, output, timed_out, stopped."""
        cap = min(cap, self.remaining() - 5)
        if cap < 5:
            return {"rc": None, "seconds": 0.0, "out": "", "timed_out": True, "stopped": False,
                    "not_started": "the suite's time budget is used up"}
        self.say(f"{label}: {' '.join(cmd)}  (cap {cap:.0f} s)")
        self.log.write(f"\n===== {label} =====\n$ {' '.join(cmd)}\n")
        self.log.flush()
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        self.child = proc
        chunks: list[str] = []

        def pump():
            for line in proc.stdout:
                chunks.append(line)
                self.log.write(line)
                if self.args.verbose:
                    print("    | " + line, end="", flush=True)
            self.log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = stopped = False
        while proc.poll() is None:
            if time.monotonic() - t0 > cap:
                timed_out = True
                break
            if stop_when is not None and stop_when():
                stopped = True
                break
            time.sleep(0.5)
        if proc.poll() is None:
            self.kill_group(proc, hard=stopped)
        proc.wait()
        reader.join(timeout=10)
        self.child = None
        seconds = time.monotonic() - t0
        out = "".join(chunks)
        status = "stopped on purpose" if stopped else ("hit its cap" if timed_out else f"exit {proc.returncode}")
        self.say(f"{label}: {status} after {seconds:.0f} s")
        return {"rc": proc.returncode, "seconds": seconds, "out": out, "timed_out": timed_out, "stopped": stopped}

    @staticmethod
    def kill_group(proc: subprocess.Popen, hard: bool = False) -> None:
        """End the process group this suite started for ``proc`` (and nothing else)."""
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            return
        if not hard:
            try:
                os.killpg(pgid, signal.SIGTERM)
                proc.wait(timeout=10)
                return
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def write_json(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.data["table"] = self.table_rows()
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.json_path)

    def step_result(self, step: str, **kw) -> dict:
        entry = self.data["steps"][step]
        entry.update(kw)
        return entry

    def capped(self, name: str, gpu: float, dry: float) -> float:
        return dry if self.dry else gpu

    # ------------------------------------------------------------------ install

    def probe_imports(self) -> dict[str, str | None]:
        code = ("import importlib, json, sys\nres = {}\nfor m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n"
                "        res[m] = None\n    except BaseException as e:\n        res[m] = f'{type(e).__name__}: {e}'[:300]\n"
                "print(json.dumps(res))")
        r = subprocess.run([PY, "-c", code, *REQUIRED], capture_output=True, text=True, env=self.env, timeout=300)
        try:
            return json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {m: f"import probe failed: {r.stderr[-300:]}" for m in REQUIRED}

    def probe_torch(self) -> dict:
        code = ("import json, torch\nd = {'version': torch.__version__, 'cuda': torch.version.cuda, "
                "'available': torch.cuda.is_available()}\nif d['available']:\n    d['device'] = torch.cuda.get_device_name()\n"
                "    d['memory_gib'] = torch.cuda.get_device_properties(0).total_memory / 2**30\nprint(json.dumps(d))")
        try:
            r = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=self.env, timeout=180)
            return json.loads(r.stdout.strip().splitlines()[-1])
        except Exception as e:  # noqa: BLE001 -- any failure is "no usable torch"
            return {"error": f"{type(e).__name__}: {e}"[:300]}

    def installed_dists(self, names: list[str]) -> dict[str, str | None]:
        """{distribution: installed version or None} as the suite's Python sees it."""
        code = ("import json, sys\nfrom importlib import metadata\nres = {}\nfor n in sys.argv[1:]:\n    try:\n"
                "        res[n] = metadata.version(n)\n    except metadata.PackageNotFoundError:\n        res[n] = None\n"
                "print(json.dumps(res))")
        try:
            r = subprocess.run([PY, "-c", code, *names], capture_output=True, text=True, env=self.env, timeout=120)
            return json.loads(r.stdout.strip().splitlines()[-1])
        except Exception:  # noqa: BLE001 -- then install them all
            return {}

    def pip(self, label: str, *args: str, cap: float = 300) -> bool:
        r = self.run(label, [PY, "-m", "pip", "install", "--disable-pip-version-check", *args], cap)
        return r["rc"] == 0

    def wheelhouse(self) -> Path | None:
        for cand in (self.args.wheelhouse, os.environ.get("IAIS_WHEELHOUSE"), str(ROOT / ".whl")):
            if cand and Path(cand).is_dir() and any(Path(cand).glob("*.whl")):
                return Path(cand)
        return None

    def install(self) -> bool:
        t0 = time.monotonic()
        info: dict = {"wheelhouse": None, "actions": []}
        self.data["install"] = info
        smi = shutil.which("nvidia-smi")
        if not smi:
            info["error"] = "nvidia-smi not found: no NVIDIA driver on this machine (use --dry on a CPU machine)"
            return False
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=60)
        head = subprocess.run([smi], capture_output=True, text=True, timeout=60).stdout
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", head)
        cuda = (int(m.group(1)), int(m.group(2))) if m else None
        info["driver_cuda"] = f"{cuda[0]}.{cuda[1]}" if cuda else None
        self.say(f"GPU: {info['nvidia_smi']}; driver supports CUDA {info['driver_cuda']}")

        wh = self.wheelhouse()
        info["wheelhouse"] = str(wh) if wh else None
        torch_info = self.probe_torch()
        if not torch_info.get("available"):
            info["actions"].append(f"no usable CUDA torch ({torch_info}); installing one")
            tried = []
            if wh and list(wh.glob("torch-*.whl")):
                tried.append("wheelhouse")
                self.pip("install torch from the wheelhouse", "--no-index", "--find-links", str(wh), "torch")
                torch_info = self.probe_torch()
            if not torch_info.get("available") and cuda:
                index = f"https://download.pytorch.org/whl/cu{cuda[0]}{cuda[1]}"
                tried.append(index)
                self.pip(f"install torch from {index}", "--timeout", "20", "--retries", "0", "torch",
                         "--index-url", index, cap=420)
                torch_info = self.probe_torch()
            if not torch_info.get("available"):
                info["error"] = (
                    f"needs a CUDA build of torch for the driver's CUDA {info['driver_cuda']} (a cu"
                    f"{cuda[0] if cuda else 'XX'}{cuda[1] if cuda else 'X'} wheel, torch>=2.4,<2.14); none is usable "
                    f"({torch_info}) and installing one failed (tried: {', '.join(tried) or 'nothing'}; no network?)")
                return False
        else:
            info["actions"].append(f"torch {torch_info['version']} (CUDA {torch_info['cuda']}) already there: kept")
        info["torch"] = torch_info

        missing = {m: e for m, e in self.probe_imports().items() if e}
        if missing and wh:
            # Only distributions that are not installed yet: the image's own versions stay.
            present = self.installed_dists([p.name.split("-")[0] for p in wh.glob("*.whl")])
            wheels = sorted(str(p) for p in wh.glob("*.whl")
                            if not p.name.startswith("torch-") and not present.get(p.name.split("-")[0]))
            info["actions"].append(f"missing {sorted(missing)}: installing {len(wheels)} wheel(s) from {wh}"
                                   f" ({', '.join(Path(w).name for w in wheels)})")
            if wheels:
                self.pip("install the wheelhouse", "--no-index", "--no-deps", "--find-links", str(wh), *wheels)
            missing = {m: e for m, e in self.probe_imports().items() if e}
        if missing:
            names = sorted({REQUIRED[m] for m in missing if m != "torch"})
            info["actions"].append(f"still missing {sorted(missing)}: trying the package index")
            if names:
                self.pip("install from the index", "--timeout", "15", "--retries", "0", *names, cap=300)
            missing = {m: e for m, e in self.probe_imports().items() if e}
        if missing:
            info["error"] = ("missing Python packages: " + "; ".join(f"{REQUIRED[m]} ({e})" for m, e in missing.items())
                             + ". Build a wheelhouse where PyPI is reachable (bash benchmarks/gpu_wheels.sh -> .whl/)"
                             " and carry it (run's carry: [\".whl\"]), or pass --wheelhouse DIR")
            return False
        ok = self.pip("pip install -e .", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(ROOT), cap=240)
        info["actions"].append("pip install -e . (--no-deps --no-build-isolation): " + (
            "done" if ok else "failed; the suite imports the package from the checkout (PYTHONPATH) instead"))
        info["seconds"] = round(time.monotonic() - t0, 1)
        self.say(f"install took {info['seconds']:.0f} s")
        return True

    # ------------------------------------------------------------------ background build

    def start_prebuild(self) -> None:
        """Compile DeepSpeed's CPU Adam (step 4's ZeRO-Offload optimizer) in the background while the
        first steps measure, so that step 4 finds it built (torch's extension lock makes step 4 wait
        for a build still running rather than start a second one)."""
        code = ("import time; t = time.time()\nfrom deepspeed.ops.op_builder import CPUAdamBuilder\n"
                "CPUAdamBuilder().load()\nprint(f'PREBUILD cpu_adam ready in {time.time() - t:.0f} s', flush=True)")
        self.prebuild_log = open(self.work / "prebuild.log", "w")
        self.prebuild = subprocess.Popen([PY, "-c", code], cwd=ROOT, env=self.env, stdout=self.prebuild_log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.prebuild_t0 = time.monotonic()
        self.say("building DeepSpeed's CPU Adam op in the background (for step 4)")

    def finish_prebuild(self) -> None:
        proc = getattr(self, "prebuild", None)
        if proc is None:
            return
        if proc.poll() is None:
            self.kill_group(proc, hard=True)
            proc.wait()
        self.prebuild_log.close()
        text = (self.work / "prebuild.log").read_text(errors="replace")
        self.log.write("\n===== background build of cpu_adam =====\n" + text)
        self.data["prebuild_cpu_adam"] = {"rc": proc.returncode,
                                          "result": error_line(text) if proc.returncode else text.strip()[-200:]}
        self.prebuild = None

    # ------------------------------------------------------------------ step 1

    def step1(self) -> None:
        cmd = [PY, str(BENCH / "iais_term.py"), "--device", self.device]
        cmd += ["--repeats", "2", "--warmup", "1"] if self.dry else ["--repeats", "11"]
        r = self.run("step 1: IAIS term", cmd, self.capped("1", 120, 180))
        res = [x for x in results(r["out"]) if "speedup_static" in x]
        entry = self.step_result("1", seconds=round(r["seconds"], 1), log_tail=tail(r["out"]))
        if not res:
            entry.update(status="timeout" if r["timed_out"] else "failed",
                         reason=r.get("not_started") or error_line(r["out"]))
            return
        x = res[-1]
        entry.update(status="ok", reason=None, figures=x)

    # ------------------------------------------------------------------ step 2

    def step2(self) -> None:
        if self.dry:
            cmd = [PY, str(BENCH / "model_step.py"), "--sweep", "--device", "cpu", "--sizes", "tiny",
                   "--start-pairs", "4", "--max-pairs", "8", "--repeats", "2", "--threads", "2"]
        else:
            cmd = [PY, str(BENCH / "model_step.py"), "--device", "cuda", "--sizes", "base,large", "--repeats", "3",
                   "--max-pairs", "4096", "--threads", "8"]
        r = self.run("step 2: model step", cmd, self.capped("2", 240, 240))
        rows = results(r["out"])
        steps = [x for x in rows if x.get("kind") == "step"]
        dev = next((x for x in rows if x.get("kind") == "device"), {})
        entry = self.step_result("2", seconds=round(r["seconds"], 1), log_tail=tail(r["out"]),
                                 figures={"device": dev, "rows": steps,
                                          "fill": [x for x in rows if x.get("kind") == "fill"]})
        expected = 2 * (3 + 2)  # per size: bert + 2 (ckpt off) + 2 (ckpt on)
        if not steps:
            entry.update(status="timeout" if r["timed_out"] else "failed",
                         reason=r.get("not_started") or error_line(r["out"]))
        elif r["rc"] != 0 or len(steps) < (5 if self.dry else expected):
            entry.update(status="partial", reason=("hit its cap" if r["timed_out"] else error_line(r["out"]))
                         + f": {len(steps)} of {5 if self.dry else expected} rows")
        else:
            entry.update(status="ok", reason=None)

    # ------------------------------------------------------------------ steps 3 and 4

    def demo_data(self) -> Path | None:
        root = self.work / ("demo_tiny" if self.dry else "demo")
        if (root / "manifest.json").is_file():
            return root
        cmd = [PY, str(BENCH / "gpu_suite_steps.py"), "demo", "--out", str(root)] + (["--tiny"] if self.dry else [])
        r = self.run("demo data", cmd, 180)
        return root if r["rc"] == 0 and (root / "manifest.json").is_file() else None

    def accelerator(self) -> dict:
        code = ("from deepspeed.accelerator import get_accelerator as g; a = g(); "
                "print('ACCEL', a._name, a.communication_backend_name())")
        try:
            r = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=self.env, timeout=180, cwd=ROOT)
            m = re.search(r"ACCEL (\S+) (\S+)", r.stdout)
            return {"accelerator": m.group(1), "backend": m.group(2)} if m else {"error": error_line(r.stdout + r.stderr)}
        except Exception as e:  # noqa: BLE001
            return {"error": str(e)[:300]}

    def launcher(self, label: str, out: Path, data: Path, overrides: list[str], cap: float, stop_at_step=None) -> dict:
        ranks = 2 if self.dry else 1
        cmd = [PY, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(free_port()),
               "launchers/train.py", "--config", "configs/demo.yaml",
               f"data.root={data}", "data.make_demo=false", f"train.output_dir={out}", *overrides]
        shutil.rmtree(out, ignore_errors=True)
        stop = None
        if stop_at_step is not None:
            def stop() -> bool:
                return any(rec.get("step") == stop_at_step for rec in read_jsonl(out / "train_log.jsonl"))
        r = self.run(label, cmd, cap, stop_when=stop)
        records = read_jsonl(out / "train_log.jsonl")
        eval_path = out / "eval.json"
        report = json.loads(eval_path.read_text()) if eval_path.is_file() else None
        m = re.search(r"model: ([\d.]+)M parameters", r["out"])
        return {"cmd": " ".join(cmd), "rc": r["rc"], "seconds": round(r["seconds"], 1), "timed_out": r["timed_out"],
                "stopped_on_purpose": r["stopped"], "records": records, "report": report,
                "params_m": float(m.group(1)) if m else None, "out": r["out"], "ranks": ranks,
                "not_started": r.get("not_started")}

    @staticmethod
    def throughput(run: dict, micro_batch: int) -> dict:
        recs = [x for x in run["records"] if isinstance(x.get("samples_per_s"), (int, float))]
        later = recs[1:] or recs
        sps = statistics.median(x["samples_per_s"] for x in later) if later else None
        mem = max((x.get("memory_mb") or 0) for x in recs) if recs else None
        return {"samples_per_s": sps, "step_s": (micro_batch * run["ranks"] / sps) if sps else None,
                "memory_mb_max": mem, "logged_steps": [x.get("step") for x in recs]}

    def step3(self) -> None:
        entry = self.step_result("3")
        data = self.demo_data()
        if data is None:
            entry.update(status="failed", reason="could not make the demo data (see gpu_suite.log)")
            return
        accel = self.accelerator()
        steps, mb = (16, 8) if self.dry else (300, 32)
        common = [f"train.steps={steps}", f"objectives.mlm_only_steps={4 if self.dry else 100}",
                  f"train.log_every={4 if self.dry else 20}", f"train.micro_batch_size={mb}"]
        if self.dry:
            common += ["objectives.num_candidates=4", "objectives.num_hard=2", "eval.batch_size=256"]
        figures = {"accelerator": accel, "steps": steps, "micro_batch_size": mb, "runs": {}}
        entry["figures"] = figures
        problems = []
        t0 = time.monotonic()
        for prec in ("bf16", "fp16"):
            run = self.launcher(f"step 3: launcher ZeRO-2 {prec}", self.work / f"launcher_{prec}", data,
                                common + [f"train.deepspeed_config=configs/deepspeed/zero2_{prec}.json"],
                                self.capped("3", 200, 240))
            last = run["records"][-1] if run["records"] else {}
            rep = run["report"] or {}
            fig = {"rc": run["rc"], "seconds": run["seconds"], "eval_json": run["report"] is not None,
                   "cmd": run["cmd"], **self.throughput(run, mb),
                   "nonfinite_steps": rep.get("nonfinite_steps", last.get("nonfinite_steps")),
                   "overflow_steps_total": last.get("overflow_steps_total"),
                   "overflow_steps_eval": rep.get("overflow_steps"),
                   "rsum": rep.get("rsum"), "final_loss": last.get("loss")}
            if prec == "fp16":
                # train_log's overflow_steps_total is summed over ranks (metrics.SUMMED) and averaged over
                # the logging window; eval.json's overflow_steps is the trainer's own count.
                half = [x for x in run["records"] if x.get("step", 0) <= steps // 2]
                if run["records"] and half:
                    fig["overflow_steps_second_half_log"] = (last.get("overflow_steps_total", 0)
                                                             - half[-1].get("overflow_steps_total", 0)) / run["ranks"]
                over = fig["overflow_steps_eval"]
                late = fig.get("overflow_steps_second_half_log")
                fig["survived_warmup"] = bool(
                    run["rc"] == 0 and run["report"] is not None and over is not None and over < steps // 2
                    and not fig["nonfinite_steps"] and math.isfinite(last.get("loss", float("nan")))
                    and (late is None or late < 1))
            ok = run["rc"] == 0 and run["report"] is not None
            if not ok:
                reason = run["not_started"] or ("hit its cap" if run["timed_out"] else error_line(run["out"]))
                if self.dry and re.search(r"(fp16|bf16|half|bfloat16).{0,80}(not supported|unsupported|does not support)", run["out"], re.I):
                    fig["skipped"] = f"skipped on CPU: {reason}"
                else:
                    fig["error"] = reason
                    problems.append(f"{prec}: {reason}")
            fig["log_tail"] = tail(run["out"], 1500)
            figures["runs"][prec] = fig
            self.write_json()
        entry["seconds"] = round(time.monotonic() - t0, 1)
        if len(problems) == 2:
            entry.update(status="failed", reason="; ".join(problems))
        elif problems:
            entry.update(status="partial", reason="; ".join(problems))
        else:
            entry.update(status="ok", reason=None)

    def step4(self) -> None:
        entry = self.step_result("4")
        data = self.demo_data()
        if data is None:
            entry.update(status="failed", reason="could not make the demo data (see gpu_suite.log)")
            return
        steps, mb = (4, 8) if self.dry else (5, 32)
        size = "tiny" if self.dry else "xl"
        overrides = [f"model.size={size}", "train.deepspeed_config=configs/deepspeed/zero3_offload_bf16.json",
                     f"train.steps={steps}", "objectives.mlm_only_steps=2", "train.log_every=1",
                     f"train.micro_batch_size={mb}"]
        if self.dry:
            overrides += ["objectives.num_candidates=4", "objectives.num_hard=2"]
        run = self.launcher(f"step 4: ZeRO-3 offload {size}", self.work / "zero3_offload", data, overrides,
                            self.capped("4", 300, 300), stop_at_step=steps)
        thr = self.throughput(run, mb)
        recs = run["records"]
        fig = {"model_size": size, "params_m": run["params_m"], "steps": steps, "micro_batch_size": mb,
               "cmd": run["cmd"], "rc": run["rc"], "seconds": run["seconds"],
               "stopped_after_last_step": run["stopped_on_purpose"], **thr,
               "first_step_samples_per_s": recs[0].get("samples_per_s") if recs else None,
               "log_tail": tail(run["out"], 1500)}
        entry.update(figures=fig, seconds=run["seconds"])
        if recs and any(x.get("step") == steps for x in recs):
            entry.update(status="ok", reason=None)
        elif recs:
            entry.update(status="partial", reason=f"{len(recs)} of {steps} steps logged: "
                         + ("hit its cap" if run["timed_out"] else error_line(run["out"])))
        else:
            entry.update(status="timeout" if run["timed_out"] else "failed",
                         reason=run["not_started"] or ("hit its cap before any step" if run["timed_out"]
                                                       else error_line(run["out"])))

    # ------------------------------------------------------------------ step 5

    def step5(self) -> None:
        entry = self.step_result("5")
        worker = [PY, str(BENCH / "gpu_suite_steps.py")]
        if self.dry:
            mining = worker + ["mining", "--device", "cpu", "--size", "tiny", "--itc-dim", "64", "--pool", "24",
                               "--anchors", "4", "--hard", "3", "--shortlist", "7", "--repeats", "2", "--threads", "2"]
            rerank = worker + ["rerank", "--device", "cpu", "--size", "tiny", "--itc-dim", "64", "--images", "16",
                               "--batch-size", "256", "--allpairs-seconds", "2", "--threads", "2"]
        else:
            mining = worker + ["mining", "--device", "cuda", "--size", "base", "--pool", "400", "--anchors", "32",
                               "--hard", "31", "--shortlist", "63", "--repeats", "3"]
            rerank = worker + ["rerank", "--device", "cuda", "--size", "base", "--images", "1000",
                               "--batch-size", "1024", "--allpairs-seconds", "10"]
        t0 = time.monotonic()
        r1 = self.run("step 5: mining", mining, self.capped("5", 90, 120))
        r2 = self.run("step 5: evaluation all pairs vs re-rank", rerank, self.capped("5", 150, 120))
        m_rows = [x for x in results(r1["out"]) if x.get("kind") == "mining"]
        e_rows = {x["kind"]: x for x in results(r2["out"]) if x.get("kind") in ("all_pairs", "itc", "rerank")}
        entry.update(seconds=round(time.monotonic() - t0, 1),
                     figures={"mining": m_rows, "evaluation": e_rows},
                     log_tail=tail(r1["out"], 1500) + "\n-----\n" + tail(r2["out"], 1500))
        problems = []
        if len(m_rows) < 3:
            problems.append("mining: " + (r1.get("not_started") or ("hit its cap" if r1["timed_out"] else error_line(r1["out"]))))
        if len(e_rows) < 3:
            problems.append("evaluation: " + (r2.get("not_started") or ("hit its cap" if r2["timed_out"] else error_line(r2["out"]))))
        if not m_rows and not e_rows:
            entry.update(status="timeout" if (r1["timed_out"] and r2["timed_out"]) else "failed", reason="; ".join(problems))
        elif problems:
            entry.update(status="partial", reason="; ".join(problems))
        else:
            entry.update(status="ok", reason=None)

    # ------------------------------------------------------------------ the table

    def verdict(self, ok: bool | None) -> str:
        if self.dry:
            return "dry"
        if ok is None:
            return ""
        return "met" if ok else "NOT met"

    def mem_unit(self) -> str:
        """train_log's memory_mb: the GPU's peak allocated memory, on the CPU the rank's peak RSS."""
        return "MB peak RSS/rank" if self.dry else "MB peak/GPU"

    def table_rows(self) -> list[list[str]]:
        rows: list[list[str]] = []
        st = self.data["steps"]
        inst = self.data.get("install") or {}
        if inst.get("error"):
            rows.append(["0", "INSTALL FAILED", inst["error"], "", ""])

        def status_row(step: str) -> bool:
            """A row for a step that is not plainly ok; True when it has figures to show."""
            e = st[step]
            if e["status"] != "ok":
                rows.append([step, e["status"].upper(), e.get("reason") or "", "", ""])
            return bool(e.get("figures"))

        if status_row("1"):
            x = st["1"]["figures"]
            target = x.get("target_speedup", 20)
            ms = x["ms"]
            rows.append(["1", "IAIS fwd+bwd B=32 H=12 N=100 d=64: batched (static) vs loop",
                         f"{x['speedup_static']:.1f}x ({ms['static_bounds']:.2f} vs {ms['reference']:.2f} ms)",
                         f">= {target:.0f}x", self.verdict(x["speedup_static"] >= target)])
            rows.append(["1", "  same, default bounds (read from the masks)",
                         f"{x['speedup_default']:.1f}x ({ms['default_bounds']:.2f} ms)", "", ""])
            sync = x.get("sync_check", {})
            if "static_bounds" in sync:
                rows.append(["1", "host syncs, static-bound step (sync_debug_mode error)",
                             sync["static_bounds"], "no host sync", self.verdict(sync["static_bounds"] == "no host sync")])
                rows.append(["1", "  control: default-bound step (must sync)", sync.get("default_bounds", "?"), "", ""])
            else:
                rows.append(["1", "host syncs (set_sync_debug_mode error)", f"skipped on CPU: {sync.get('skipped', '?')}",
                             "no host sync", ""])
        if status_row("2"):
            fig = st["2"]["figures"]
            by = {}
            for x in fig["rows"]:
                by[(x["size"], x["model"], x["iais"], x["checkpointing"])] = x
            for size in dict.fromkeys(x["size"] for x in fig["rows"]):
                on = by.get((size, "ours", True, False))
                off = by.get((size, "ours", False, False))
                bert = by.get((size, "bert", False, False))
                con = by.get((size, "ours", True, True))
                coff = by.get((size, "ours", False, True))
                if on:
                    mem = f", peak {on['peak_gib']:.1f} GiB" if on.get("peak_gib") is not None else ""
                    rows.append(["2", f"{size}: IAIS on, ckpt off, {on['pairs']} pairs/micro-batch",
                                 f"{on['samples_per_s']:.0f} samples/s, {on['tokens_per_s']:.0f} tok/s{mem}", "", ""])
                    target = size == "large"
                    rows.append(["2", f"{size}: MFU (IAIS on, ckpt off)", fmt(on.get("mfu"), ".1%"),
                                 ">= 40%" if target else "",
                                 self.verdict(on["mfu"] >= 0.40) if target and on.get("mfu") is not None else
                                 ("dry" if self.dry else "")])
                if con:
                    mem = f", peak {con['peak_gib']:.1f} GiB" if con.get("peak_gib") is not None else ""
                    rows.append(["2", f"{size}: IAIS on, ckpt on, {con['pairs']} pairs/micro-batch",
                                 f"{con['samples_per_s']:.0f} samples/s, MFU {fmt(con.get('mfu'), '.1%')}{mem}", "", ""])
                if on and off:
                    ratio = on["step_s"] / off["step_s"]
                    extra = f"; ckpt on {con['step_s'] / coff['step_s']:.3f}x" if con and coff else ""
                    rows.append(["2", f"{size}: IAIS overhead (step time on / off, ckpt off)", f"{ratio:.3f}x{extra}",
                                 "<= 1.05x", self.verdict(ratio <= 1.05)])
                if off and bert:
                    ratio = off["step_s"] / bert["step_s"]
                    rows.append(["2", f"{size}: framework step / bare BertModel (IAIS off)",
                                 f"{ratio:.3f}x", "<= 1.10x", self.verdict(ratio <= 1.10)])
        if status_row("3"):
            fig = st["3"]["figures"]
            acc = fig.get("accelerator", {})
            rows.append(["3", "DeepSpeed accelerator / communication backend",
                         f"{acc.get('accelerator', '?')} / {acc.get('backend', acc.get('error', '?'))}",
                         "nccl" if not self.dry else "gloo (dry)", self.verdict(acc.get("backend") == "nccl")
                         if not self.dry else "dry"])
            for prec, f in fig["runs"].items():
                if f.get("skipped"):
                    rows.append(["3", f"ZeRO-2 {prec}", f["skipped"], "", ""])
                    continue
                done = f["rc"] == 0 and f["eval_json"]
                val = (f"finished, eval.json written, {fmt(f.get('samples_per_s'), '.0f')} samples/s, "
                       f"{fmt(f.get('memory_mb_max'), '.0f')} {self.mem_unit()}" if done else f"FAILED: {f.get('error', '?')}")
                rows.append(["3", f"ZeRO-2 {prec}, {fig['steps']} steps: report", val, "eval.json", self.verdict(done)])
                if prec == "fp16":
                    rows.append(["3", "fp16 overflow steps: eval.json / train_log (2nd half)",
                                 f"{fmt(f.get('overflow_steps_eval'), '.0f')} of {fig['steps']} / "
                                 f"{fmt(f.get('overflow_steps_total'), '.1f')} "
                                 f"({fmt(f.get('overflow_steps_second_half_log'), '.1f')}); survived: "
                                 f"{'yes' if f.get('survived_warmup') else 'no'}",
                                 "survives warm-up", self.verdict(f.get("survived_warmup"))])
        if status_row("4"):
            f = st["4"]["figures"]
            rows.append(["4", f"ZeRO-3 + CPU offload, {f['model_size']} ({fmt(f.get('params_m'), '.0f')}M params), "
                              f"micro-batch {f['micro_batch_size']}",
                         f"{fmt(f.get('step_s'), '.2f')} s/step, {fmt(f.get('samples_per_s'), '.1f')} samples/s, "
                         f"{fmt(f.get('memory_mb_max'), '.0f')} {self.mem_unit()}", "", ""])
        if status_row("5"):
            fig = st["5"]["figures"]
            for x in fig["mining"]:
                extra = (f" (+{x['itc_passes_ms']:.1f} ms ITC passes: {x['speedup_vs_cross_with_passes']:.1f}x)"
                         if x.get("itc_passes_ms") is not None else "")
                note = " [library call failed: candidates moved to the device]" if x.get("library_error") else ""
                rows.append(["5", f"mining/step {x['name']}: {x['anchors']} anchors x {x['candidates']} candidates",
                             f"{x['mining_ms']:.1f} ms, {x['cross_encoder_pairs']} pairs scored, "
                             f"{x['speedup_vs_cross']:.1f}x cheaper{extra}{note}", "", ""])
            ev = fig["evaluation"]
            if "all_pairs" in ev:
                a = ev["all_pairs"]
                rows.append(["5", f"eval all pairs, {a['images']} images x {a['captions']} captions",
                             f"{a['pairs_per_s']:.0f} pairs/s -> {a['seconds_full']:.0f} s for {a['pairs_full']} pairs"
                             + (f" (extrapolated from {a['pairs_measured']})" if a["extrapolated"] else ""), "", ""])
            if "rerank" in ev:
                x = ev["rerank"]
                itc = ev.get("itc", {}).get("seconds", 0.0)
                rows.append(["5", f"eval ITC top-{x['k']} + re-rank ({x['pairs']} pairs, {x['reduction']:.0f}x fewer)",
                             f"{x['pairs_per_s']:.0f} pairs/s, {x['seconds_total']:.1f} s (ITC {itc:.1f} s): "
                             f"{x['speedup_vs_all_pairs']:.1f}x faster", "", ""])
        return rows

    def print_table(self, title: str = "") -> None:
        rows = self.table_rows()
        head = ["step", "measurement", "value", "target", "verdict"]
        widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(5)]
        d = self.data
        mark = ("DRY (CPU): tiny shapes, code paths only, NOT performance figures" if self.dry
                else "GPU measurements")
        lines = ["", "=" * 100, f"iais_scale GPU suite (issue 17): {mark}{title}",
                 f"date {d['date']}; device {d['device']}: {d.get('device_name', '?')}; torch {d.get('torch', '?')}; "
                 f"elapsed {time.monotonic() - self.t0:.0f} s of a {self.args.budget_s:.0f} s budget"]
        if not self.dry:
            lines.append(f"MFU peak: {d.get('peak_note', H200_PEAK_NOTE)}")
        if d.get("install") and d["install"].get("seconds") is not None:
            lines.append(f"install: {d['install']['seconds']:.0f} s ({'; '.join(d['install'].get('actions', []))})")
        lines.append("-" * 100)
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        for r in rows:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
        lines.append("=" * 100)
        text = "\n".join(lines)
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    # ------------------------------------------------------------------ main

    def device_summary(self) -> None:
        t = self.probe_torch()
        if "error" in t:
            self.data["device_name"] = f"unknown ({t['error'].split(':')[0]})"
        else:
            self.data.update(torch=t["version"], cuda_available=t["available"], device_name=t.get("device", "cpu"))
        if self.dry:
            self.data["device_name"] = f"cpu ({os.cpu_count()} cores), dry run"
            self.data["peak_note"] = "none: MFU is not computed on the CPU"
        else:
            self.data["peak_note"] = H200_PEAK_NOTE if "H200" in self.data.get("device_name", "") else (
                "the model_step.py table of datasheet dense bf16 peaks for this device (see step 2's device row)")

    def main(self) -> int:
        try:
            return self._main()
        finally:
            if not self.args.keep_work and not self.args.work:
                shutil.rmtree(self.work, ignore_errors=True)

    def _main(self) -> int:
        def on_signal(signum, frame):
            if self.child is not None:
                self.kill_group(self.child, hard=True)
            if getattr(self, "prebuild", None) is not None and self.prebuild.poll() is None:
                self.kill_group(self.prebuild, hard=True)
            self.say(f"signal {signum}: stopping; the results so far follow")
            for e in self.data["steps"].values():
                if e["status"] == "not run":
                    e["reason"] = f"the suite was stopped (signal {signum})"
            self.write_json()
            self.print_table(" (STOPPED)")
            if not self.args.keep_work and not self.args.work:
                shutil.rmtree(self.work, ignore_errors=True)
            os._exit(1)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.say(f"{'dry run on the CPU' if self.dry else 'GPU run'}; results -> {self.json_path}; work {self.work}")
        if not self.dry and not self.args.skip_install:
            ok = self.install()
            if not ok:
                err = self.data["install"].get("error", "install failed")
                self.say("INSTALL FAILED: " + err)
                for e in self.data["steps"].values():
                    if e["status"] == "not run":
                        e.update(reason="install failed (above)")
                self.data["device_name"] = self.data["install"].get("nvidia_smi", "?")
                self.write_json()
                self.print_table(" (INSTALL FAILED)")
                return 3
        self.device_summary()
        if not self.dry and not self.data.get("cuda_available"):
            err = (f"torch {self.data.get('torch', '?')} sees no CUDA device: nothing to measure "
                   "(use --dry for the CPU code-path check)")
            self.say("NO GPU: " + err)
            self.data["install"] = {**(self.data.get("install") or {}), "error": err}
            for e in self.data["steps"].values():
                if e["status"] == "not run":
                    e.update(reason="no CUDA device (above)")
            self.write_json()
            self.print_table(" (NO GPU)")
            return 3
        self.write_json()
        if "4" in self.selected:
            self.start_prebuild()
        for s in ORDER:
            if s not in self.selected:
                continue
            if self.remaining() < 15:
                self.step_result(s, status="not run", reason="the suite's time budget (--budget-s) is used up")
                continue
            self.say(f"step {s}: {STEP_NAMES[s]}")
            try:
                getattr(self, f"step{s}")()
            except Exception as e:  # noqa: BLE001 -- a broken step must not lose the others' figures
                self.step_result(s, status="failed", reason=f"suite error: {type(e).__name__}: {e}"[:400])
            e = self.data["steps"][s]
            self.say(f"step {s}: {e['status']}" + (f" ({e['reason']})" if e.get("reason") else ""))
            self.write_json()
            if e["status"] in ("timeout", "partial"):
                self.print_table(f" (so far: step {s} {e['status']})")
        self.finish_prebuild()
        self.write_json()
        self.print_table()
        self.say(f"JSON: {self.json_path}; log of every subprocess: {self.log_path}")
        bad = [s for s, e in self.data["steps"].items() if e["status"] not in ("ok", "skipped")]
        return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="the CPU, tiny shapes, no installs: checks the code paths")
    ap.add_argument("--steps", default=",".join(STEP_NAMES), help="subset, e.g. 1,2,5 (default: all)")
    ap.add_argument("--out", help="folder (or .json file) for gpu_suite.json and gpu_suite.log (default: $OUT)")
    ap.add_argument("--work", help="scratch folder for demo data and runs (default: a temporary folder, removed)")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary scratch folder")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="whole-suite time budget in seconds (default 510 on the GPU, 1200 dry)")
    ap.add_argument("--wheelhouse", help="folder of wheels for the install (default $IAIS_WHEELHOUSE, else .whl/)")
    ap.add_argument("--skip-install", action="store_true", help="GPU run without the install phase")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 1200.0 if args.dry else 510.0
    return Suite(args).main()


if __name__ == "__main__":
    sys.exit(main())

"""Every GPU figure in one command, one table: time to val/loss <= 1.47 for configs/gpt.yaml (compiled and
eager, with where start-up time goes; then with the modern recipe, whose best val/loss should reach <= 1.45),
ms/step eager vs compiled, the Trainer against the best plain loop,
FSDP on one device (100 steps, then a resume), generation tokens/s, and peak memory (allocated and
reserved) of seed-large and of the seed's big config. About 7 minutes on one H100.

    python benchmarks/gpu_check.py [--out DIR]     # needs a CUDA GPU; logs of every run go to DIR
    python benchmarks/gpu_check.py --smoke         # the same code paths on a CPU with tiny settings (tests)

On a machine with torch and lightning but not the rest (jsonargparse, ...), carry wheels: see README.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from _env import describe
from recipe import RECIPE
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHARLM = [sys.executable, "-m", "lightning_charlm"]
TINY = (
    "--model.block_size 32 --model.n_layer 2 --model.n_head 2 --model.n_embd 32 --model.dropout 0.0 "
    "--data.block_size 32 --data.batch_size 16 --trainer.accelerator cpu --generate.max_new_tokens 20"
).split()


class Check:
    """The run's settings: full size on a GPU, or tiny on a CPU for --smoke."""

    def __init__(self, smoke: bool, out: Path):
        self.smoke, self.out, self.rows = smoke, out, []
        self.corpus = None
        if smoke:  # a small generated corpus with some structure, so a tiny model learns within seconds
            words = "the king queen shall not love speak night my lord and to".split()
            lines = [
                " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(3 + i % 5)) for i in range(400)
            ]
            self.corpus = out / "corpus.txt"
            self.corpus.write_text(".\n".join(lines) + "\n", encoding="utf-8")

    def fit_args(self) -> list[str]:
        base = ["-c", str(REPO / "configs/gpt.yaml"), "--trainer.enable_progress_bar=false"]
        if self.smoke:
            base += [*TINY, "--data.path", str(self.corpus), "--trainer.val_check_interval", "10"]
        return base

    def row(self, section: str, what: str, value: str) -> None:
        self.rows.append((section, what, value))
        print(f"  {section} | {what} | {value}", flush=True)

    def charlm(self, name: str, args: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
        """Runs `charlm ARGS` in `cwd` with the start-up timer, keeping its output in OUT/NAME.log."""
        env = os.environ | {
            "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]),
            "CHARLM_LAUNCH": repr(time.time()),
            "CHARLM_TIMING": str(self.out / f"{name}.startup.json"),
            "PYTHONUNBUFFERED": "1",
        }
        timer = json.dumps([{"class_path": "_timing.StartupTimes"}])
        cmd = [*CHARLM, *args, "--trainer.callbacks", timer]
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        (self.out / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
        if proc.returncode:
            raise RuntimeError(f"charlm {name} exited {proc.returncode}: {proc.stderr[-1500:]}")
        return proc


def val_curve(run_dir: Path) -> list:
    """val/loss events of a run folder, from all its events files (a resumed run adds one)."""
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return ea.Scalars("val/loss")


def time_to_loss(c: Check, target: float, compile: bool | None, profile: bool, recipe: bool = False) -> None:
    """compile None: the config's own setting. recipe: with the modern recipe's options (recipe.py)."""
    name = f"ttl-{'recipe' if recipe else 'compiled' if compile else 'default'}"
    extra = [] if compile is None else ["--model.compile", str(compile).lower()]
    extra += [f"--model.{k}={v}" for k, v in RECIPE.items()] if recipe else []
    extra += ["--trainer.profiler", "simple"] if profile else []
    if c.smoke:
        extra += ["--trainer.max_steps", "40"]
    with tempfile.TemporaryDirectory() as tmp:
        launch = time.time()
        c.charlm(name, [*["fit", *c.fit_args()], *extra], Path(tmp), timeout=240)
        total = time.time() - launch
        val = val_curve(next(Path(tmp).glob("logs/*/version_0")))
    hit = next((e for e in val if e.value <= target), None)
    best = min(val, key=lambda e: e.value)
    marks = json.loads((c.out / f"{name}.startup.json").read_text())
    label = "gpt.yaml" + ("" if compile is None else f", compile {compile}") + (" + recipe" if recipe else "")
    reached = f"step {hit.step + 1}, {hit.wall_time - launch:.1f} s after launch" if hit else "never"
    c.row("time to loss", f"{label}: val/loss <= {target}", reached)
    c.row(
        "time to loss",
        f"{label}: best val/loss",
        f"{best.value:.4f} at step {best.step + 1}; {total:.0f} s in all",
    )
    c.row(
        "time to loss",
        f"{label}: launch to first step done",
        f"{marks.get('first training step done', -1):.1f} s",
    )
    c.row("start-up", label, "; ".join(f"{k} {v:.1f} s" for k, v in marks.items()))


def throughput(c: Check) -> None:
    from overhead import compare

    size, steps, warmup, repeats = ("tiny", 10, 3, 1) if c.smoke else ("gpt", 300, 30, 2)
    results = {}
    for compile in (False, True):
        r = compare(size, steps, warmup, repeats, compile, path=str(c.corpus) if c.corpus else None)
        results[compile] = r
        mode = "compiled" if compile else "eager"
        c.row("throughput", f"{r['what']}, {mode}: plain loop", f"{r['plain_ms_step']:.2f} ms/step")
        c.row("throughput", f"{r['what']}, {mode}: Trainer", f"{r['trainer_ms_step']:.2f} ms/step")
        spread = ", ".join(f"{k} {lo:.0f}-{hi:.0f}" for k, (lo, hi) in r["spread"].items())
        c.row("throughput", f"{mode}: Trainer / plain (tokens/s ranges: {spread})", f"{r['ratio']:.3f}")
    host = compare(size, steps, warmup, 1, False, path=str(c.corpus) if c.corpus else None, on_device=False)
    c.row(
        "throughput",
        "eager, Trainer with the split left on the host (pinned gather)",
        f"{host['trainer_ms_step']:.2f} ms/step",
    )
    best_plain = max(r["plain_tok_s"] for r in results.values())
    best_trainer = max(r["trainer_tok_s"] for r in results.values())
    c.row("throughput", "fastest Trainer / fastest plain loop", f"{best_trainer / best_plain:.3f}")


def fsdp(c: Check) -> None:
    # Lightning refuses FSDP on a CPU, so --smoke runs the same two commands with the default strategy.
    strategy = [] if c.smoke else ["--trainer.strategy", "fsdp", "--trainer.devices", "1"]
    args = [
        "fit",
        *c.fit_args(),
        *strategy,
        "--trainer.val_check_interval",
        "50",
        "--sample.every_n_steps",
        "50",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        c.charlm("fsdp", [*args, "--trainer.max_steps", "100"], Path(tmp), timeout=150)
        c.charlm(
            "fsdp-resume",
            [*args, "--trainer.max_steps", "150", "--ckpt_path", "last"],
            Path(tmp),
            timeout=150,
        )
        run = next(Path(tmp).glob("logs/*/version_0"))
        val = val_curve(run)
        ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    losses = " -> ".join(f"{e.value:.3f}" for e in val)
    ok = ckpt["global_step"] == 150 and val[-1].value < val[0].value
    c.row("FSDP", f"{' '.join(strategy) or 'default strategy'}: val/loss at steps 50, 100, 150", losses)
    c.row("FSDP", "100 steps, then --ckpt_path last to 150", "resumed, loss falls" if ok else "FAILED")


def generation(c: Check) -> None:
    from lightning_charlm import sampling
    from lightning_charlm.models import GPT, GPTConfig

    device = "cpu" if c.smoke else "cuda"
    if c.smoke:  # the same tracing of the decode step as one graph, without minutes of C++ compiling
        sampling.COMPILE = {"backend": "aot_eager", "fullgraph": True, "dynamic": False}
    shape = dict(block_size=32, n_layer=2, n_head=2, n_embd=32) if c.smoke else {}
    net = GPT(GPTConfig(vocab_size=65, dropout=0.0, **shape)).to(device).eval()
    new = 20 if c.smoke else 500
    for compile in (False, True):
        for batch in (1, 16, 256):
            prompt = torch.zeros(batch, 1, dtype=torch.long, device=device)
            rates = []
            for _ in range(3):  # the first is a warm-up (and compiles)
                with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                    start = sync(device)
                    sampling.generate(net, prompt, new, temperature=1.0, compile=compile)
                    rates.append(batch * new / (sync(device) - start))
            how = "compiled decode step + CUDA graph" if compile else "eager"
            c.row(
                "generation",
                f"KV cache, {how}, bf16, batch {batch}, {new} tokens",
                f"{max(rates[1:]):.0f} tok/s",
            )
    profile_decode(c, net, device, 10 if c.smoke else 100)


def profile_decode(c: Check, net, device: str, tokens: int) -> None:
    """Where a compiled batch-1 token's time goes: torch.profiler over `tokens` tokens (already compiled),
    the host's time and the device's per token, and the busiest ops in OUT/gen-profile.txt."""
    from torch.profiler import ProfilerActivity, profile

    from lightning_charlm import sampling

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    with (
        torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"),
        profile(activities=activities) as p,
    ):
        start = sync(device)
        sampling.generate(net, prompt, tokens, temperature=1.0, compile=True)
        wall = sync(device) - start
    events = p.key_averages()
    host = sum(e.self_cpu_time_total for e in events) / 1e3 / tokens
    dev = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3 / tokens
    tables = [events.table(sort_by="self_cpu_time_total", row_limit=25)]
    if device == "cuda":
        tables.append(events.table(sort_by="self_device_time_total", row_limit=25))
    (c.out / "gen-profile.txt").write_text("\n\n".join(tables))
    c.row(
        "generation",
        f"compiled, batch 1, profiled over {tokens} tokens: wall / host op time / device time per token",
        f"{1e3 * wall / tokens:.3f} / {host:.3f} / {dev:.3f} ms (busiest ops: gen-profile.txt)",
    )


def memory(c: Check) -> None:
    if c.smoke:
        c.row("memory", "peak GPU memory", "needs CUDA (not measured in --smoke)")
        return
    from memory import peak_memory

    big = ["--model.n_layer=6", "--model.n_head=8", "--model.n_embd=512", "--model.block_size=512"]
    big += ["--data.block_size=512", "--data.batch_size=256", "--trainer.accumulate_grad_batches=1"]
    cases = {
        "seed-large.yaml": ("configs/seed-large.yaml", []),
        "seed's big config": ("configs/seed-large.yaml", [*big, "--model.checkpointing=false"]),
        "seed's big config, checkpointing": ("configs/seed-large.yaml", [*big, "--model.checkpointing=true"]),
    }
    for label, (config, overrides) in cases.items():
        what, allocated, reserved = peak_memory(str(REPO / config), 8, overrides)
        c.row("memory", f"{label} ({what})", f"allocated {allocated:.2f} GiB, reserved {reserved:.2f} GiB")


def sync(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny settings on the CPU: checks the code paths")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for every run's log (default: $OUT)")
    ap.add_argument(
        "--only",
        nargs="*",
        help="run only these sections (time, time-compiled, time-recipe, throughput, fsdp, gen, memory)",
    )
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU; use --smoke to check its code paths on a CPU", file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check-"))
    out.mkdir(parents=True, exist_ok=True)
    c = Check(args.smoke, out)
    target = 3.0 if args.smoke else 1.47
    # "time" runs configs/gpt.yaml as it is (with Lightning's simple profiler); "time-compiled" adds compile.
    sections = {"time": lambda: time_to_loss(c, target, compile=None, profile=True)}
    if not args.smoke:
        sections["time-compiled"] = lambda: time_to_loss(c, target, compile=True, profile=False)
    # The recipe configs/gpt-cpu.yaml won with (benchmarks/recipe.py), on gpt.yaml: its best is the issue's
    # GPU target (<= 1.45); in the smoke run it checks those code paths on the tiny model.
    sections["time-recipe"] = lambda: time_to_loss(c, target, compile=None, profile=False, recipe=True)
    sections |= {
        "throughput": lambda: throughput(c),
        "fsdp": lambda: fsdp(c),
        "gen": lambda: generation(c),
        "memory": lambda: memory(c),
    }
    print(describe(), flush=True)
    failed = []
    for name, section in sections.items():
        if args.only and name not in args.only:
            continue
        start = time.time()
        try:
            section()
        except Exception:  # one broken section must not cost the figures of the others
            failed.append(name)
            traceback.print_exc()
            c.row(name, "FAILED", "see the traceback above and the logs in " + str(out))
        print(f"[{name}: {time.time() - start:.0f} s]", flush=True)
    import lightning

    print(f"\n{describe()} | lightning {lightning.__version__} | logs in {out}")
    width = max(len(w) for _, w, _ in c.rows)
    for section, what, value in c.rows:
        print(f"{section:<12} {what:<{width}}  {value}")
    (out / "table.json").write_text(json.dumps(c.rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

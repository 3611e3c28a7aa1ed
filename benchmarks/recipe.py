"""The recipe ablation: configs/gpt-cpu.yaml's model as it was before (4 layers, 128 wide, block 128) at
a fixed wall-clock budget, trained as that config was (the GPT-2 recipe, AdamW, batch 32, lr 2e-3), with
each modern change alone, then with all of them ("all") and with the winners only ("recipe", which
configs/gpt-cpu.yaml now uses with 3 layers and its own batch and lr). Every row has the same lr schedule
(--max-steps) and stops at the budget (--trainer.max_time). Per row and seed: steps done, best val/loss,
and when val/loss first reached the target, in seconds since launch (TensorBoard wall times, as
time_to_loss.py). Run nothing else meanwhile: the rows are timed.

    python benchmarks/recipe.py --budget 150 --max-steps 450 --val-every 75          # the README's table
    python benchmarks/recipe.py --rows recipe --seeds 0 1 --data.batch_size=16       # rows, seeds, overrides
    python benchmarks/recipe.py --rows positions=rope,lr=4e-3                        # any options as a row
"""

import argparse
import statistics

from _env import describe
from time_to_loss import launch

# The GPT-2 recipe and the training settings configs/gpt-cpu.yaml had before this ablation: every row
# starts from them, whatever the config now says; options after the script's own go to charlm and win.
GPT2 = {"positions": "learned", "norm": "layernorm", "mlp": "gelu", "qk_norm": "false", "tie_head": "true",
        "zero_init": "false", "optimizer": "adamw"}  # fmt: skip
BASE = ["--model.n_layer=4", "--model.lr=2e-3", "--model.min_lr=2e-4", "--model.warmup_steps=100",
        "--data.batch_size=32"]  # fmt: skip
MODERN = {"positions": "rope", "norm": "rmsnorm", "mlp": "relu2", "qk_norm": "true", "tie_head": "false",
          "zero_init": "true", "optimizer": "muon"}  # fmt: skip
# What configs/gpt-cpu.yaml took from the table: every change that won alone (the untied head lost).
RECIPE = {k: v for k, v in MODERN.items() if k != "tie_head"}
ROWS = {
    "baseline": {},
    "rope": {"positions": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "relu2": {"mlp": "relu2"},
    "swiglu": {"mlp": "swiglu"},
    "qk_norm": {"qk_norm": "true"},
    "untied": {"tie_head": "false"},
    "zero_init": {"zero_init": "true"},
    "muon": {"optimizer": "muon"},
    "all": MODERN,
    "recipe": RECIPE,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/gpt-cpu.yaml")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), help=f"of {', '.join(ROWS)}, or k=v,k=v")
    ap.add_argument(
        "--budget", type=int, default=180, help="seconds of training per run (--trainer.max_time)"
    )
    ap.add_argument(
        "--max-steps", type=int, default=900, help="the lr schedule's length, the same for every row"
    )
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--target", type=float, default=1.80)
    args, extra = ap.parse_known_args()  # the rest goes to charlm for every row, e.g. --model.lr=3e-3
    print(describe())
    print(f"config {args.config}, budget {args.budget} s of training, max_steps {args.max_steps}, "
          f"validation every {args.val_every} steps {' '.join(extra)}")  # fmt: skip
    print(f"{'row':<28} {'seed':>4} {'steps':>6} {'best val/loss':>13} {f'<= {args.target} at':>13}")
    for row in args.rows:
        options = ROWS[row] if row in ROWS else dict(kv.split("=", 1) for kv in row.split(","))
        best = []
        for seed in args.seeds:
            overrides = [*BASE, *(f"--model.{k}={v}" for k, v in {**GPT2, **options}.items())] + [
                f"--trainer.max_steps={args.max_steps}",
                f"--trainer.max_time=00:00:{args.budget // 60:02d}:{args.budget % 60:02d}",
                f"--trainer.val_check_interval={args.val_every}",
                f"--seed_everything={seed}",
                "--sample.every_n_steps=0",
                *extra,
            ]
            val, start, _, steps = launch(args.config, overrides)
            hit = next((e for e in val if e.value <= args.target), None)
            best.append(min(e.value for e in val))
            when = f"{hit.wall_time - start:.0f} s" if hit else "never"
            print(f"{row:<28} {seed:>4} {steps:>6} {best[-1]:>13.4f} {when:>13}", flush=True)
        if len(best) > 1:
            print(f"{row:<28} {'mean':>4} {'':>6} {statistics.mean(best):>13.4f}", flush=True)


if __name__ == "__main__":
    main()

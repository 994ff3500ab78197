"""
The training log: one console line per record, out_dir/metrics.jsonl, and
wandb when asked. Rank 0 writes; the other ranks log nothing.
"""

import json
import os

from configurator import fail


class Logger:
    """Console line, out_dir/metrics.jsonl and optionally wandb; active on rank 0 only."""

    def __init__(self, cfg, rank, resume_iter):
        self.active = rank == 0
        self.path = os.path.join(cfg["out_dir"], "metrics.jsonl")
        self.wandb = None
        if not self.active:
            return
        if resume_iter is not None:
            self._truncate_after(resume_iter)
        elif os.path.exists(self.path):
            os.remove(self.path)
        if cfg["wandb_log"]:
            self.wandb = start_wandb(cfg)

    def _truncate_after(self, it):
        """Drop what a stopped run logged after its last checkpoint, and the evaluation at it: the resumed
        run redoes them. A line cut short (power loss, full disk) is dropped too."""
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                evaluation = "val_loss" in record or any(k.startswith("tasks/") for k in record)
                if record["iter"] < it or (record["iter"] == it and not evaluation):
                    kept.append(json.dumps(record) + "\n")
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def log(self, record, line=None):
        if not self.active:
            return
        if line:
            print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log(record, step=record["iter"])

    def close(self):
        """Finish the wandb run (an offline run's files are complete only then)."""
        if self.wandb:
            self.wandb.finish()
            self.wandb = None


def start_wandb(cfg):
    """A wandb run in out_dir: online with a login, offline without one (out_dir/wandb/offline-run-*, for
    `wandb sync` later). Never a prompt, never a stop: when wandb cannot start, training goes on without it."""
    try:
        import wandb
    except ImportError:
        fail("wandb_log=True needs the wandb package: pip install wandb")
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or os.path.exists(os.path.expanduser("~/.netrc"))
    mode = os.environ.get("WANDB_MODE") or ("online" if logged_in else "offline")
    try:
        return wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"] or None, config=cfg, mode=mode,
                          dir=cfg["out_dir"])
    except Exception as e:  # wandb raises many kinds (no login, no network, a service that does not start)
        print(f"warning: wandb could not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              f"training goes on, logging to {cfg['out_dir']}/metrics.jsonl only", flush=True)
        return None


def format_line(it, record):
    """`iter N | loss ... | lr ... | ... tok/s | ...`: every float of a record, units where they help."""
    parts = [f"iter {it:6d}"]
    for k, v in record.items():
        if k == "iter":
            continue
        if k == "lr":
            parts.append(f"lr {v:.2e}")
        elif k == "tokens_per_s":
            parts.append(f"{v:,.0f} tok/s")
        elif k == "target_tokens_per_s":
            parts.append(f"{v:,.0f} target tok/s")
        elif k == "fill":
            parts.append(f"fill {100 * v:.1f}%")
        elif k == "mfu":
            parts.append(f"mfu {100 * v:.1f}%")
        elif k == "mem_mb":
            parts.append(f"mem {v:,.0f}MB")
        elif isinstance(v, float):
            parts.append(f"{k} {v:.4f}")
    return " | ".join(parts)

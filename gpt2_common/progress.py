"""What a run shows a person: a model summary at start, then a progress bar on a terminal (loss, tokens/s, ETA)
or plain log lines when the output goes to a file."""

from __future__ import annotations

import re
import sys
from collections import OrderedDict
from typing import Mapping


def step_line(record: Mapping[str, float], max_steps: int) -> str:
    """A training step's log line, the same from both trainers; the optional fields where the record has them."""
    parts = [f"step {record['step']:6d}/{max_steps}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.3e}",
             f"grad norm {record['grad_norm']:.3f}", f"{record['step_time_s'] * 1000:.0f} ms/step",
             f"{record['tokens_per_s']:,.0f} tok/s"]
    if record.get("mfu") is not None:
        parts.append(f"mfu {record['mfu']:.1%}")
    if "loss_scale" in record:
        parts.append(f"loss scale {record['loss_scale']:g}")
    if "memory_gib" in record:
        parts.append(f"mem {record['memory_gib']:.2f} GiB")
    if record.get("skipped_steps"):
        parts.append(f"skipped {record['skipped_steps']}")
    return " | ".join(parts)


def eval_line(record: Mapping[str, float], max_steps: int) -> str:
    """An evaluation's line: its step, then the validation loss and HellaSwag accuracy, whichever it has."""
    parts = [f"step {record['step']:6d}/{max_steps}"]
    if "val_loss" in record:
        parts.append(f"val loss {record['val_loss']:.4f}")
    if "hellaswag_acc_norm" in record:
        parts.append(f"hellaswag acc_norm {record['hellaswag_acc_norm']:.4f}")
    return " | ".join(parts)


def model_summary(param_counts: Mapping[str, int]) -> str:
    """Parameters per module, as nanoGPT-style trainers print them. Names use either framework's spelling
    (`transformer.h.3.attn.c_attn.weight` or `h_3/attn/c_attn/kernel`); blocks are grouped, one line each."""
    groups: OrderedDict[str, int] = OrderedDict()
    for name, count in param_counts.items():
        parts = [p for p in re.split(r"[./]", name) if p not in ("transformer", "params")]
        head = parts[0]
        if head in ("h",) and len(parts) > 1:  # torch: h.3.attn...
            head = f"h.{parts[1]}"
        head = re.sub(r"^h_(\d+)$", r"h.\1", head)  # flax: h_3
        groups[head] = groups.get(head, 0) + count
    total = sum(groups.values())
    width = max(len(k) for k in groups)
    lines = [f"{'module':<{width}}  {'parameters':>14}"]
    lines += [f"{name:<{width}}  {count:>14,}" for name, count in groups.items()]
    lines.append(f"{'total':<{width}}  {total:>14,}")
    return "\n".join(lines)


class Progress:
    """A tqdm bar on a terminal; on anything else, the same information as one line per log interval."""

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", file=self.stream,
                            dynamic_ncols=True)
        self.step = initial_step

    def update(self, step: int, loss: float, tokens_per_s: float, line: str) -> None:
        """Advance to `step`; `line` is the plain log line shown when there is no terminal."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.step)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        else:
            print(line, file=self.stream, flush=True)
        self.step = step

    def write(self, line: str) -> None:
        """A message that must not be torn by the bar (evaluations, samples, checkpoints)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

"""``autoshard demo``: a small GPT trained on 4 CPU ranks (dp=2 × tp=2), checked against one process.

What it shows: progress while the ranks start and the model is captured, planned and rewritten; the
plan autoshard chose (with what its collectives are); the training; the loss curve; and the worst
deviation of the sharded run from the unmodified model trained on one process with the same global
batches. Exits non-zero if the deviation breaks the parity bound.

The ranks send their progress to this process over a queue; only this process draws.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from typing import Any

LOSS_TOL = 1e-4  # relative, per step, after many AdamW steps (contract 1 is 1e-5 over 5 steps)
PARAM_TOL = 1e-3  # relative, per parameter, AdamW

# What the plan summary's words mean, printed under it.
PLAN_LEGEND = """\
  [bold]reading the plan[/]
  column / row   weights split over tp by output / input features (a column-parallel layer feeds a
                 row-parallel one, as in Megatron-LM)
  vocab          the embedding split over tp by vocabulary rows
  all_reduce     forward: sums the partial outputs of a row-parallel layer over the tp ranks
  all_gather     forward: joins a tensor split over the tp ranks back into the whole tensor
  reduce_grad    forward: nothing (identity); backward: all-reduces over tp the gradient of a
                 replicated activation that feeds split layers (each tp rank holds only its part)
  dp buckets     gradients packed into flat buckets (bucket_mb=25 by default); each is averaged over
                 the dp ranks by one all-reduce as soon as backward has filled it, overlapping the
                 rest of backward"""


def _setup():
    from autoshard.examples.gpt import lm_loss, make_model, synthetic_batch

    model = make_model(vocab_size=256, seq_len=64, d_model=128, n_heads=4, d_ff=512, n_layers=2)
    return model, lm_loss, synthetic_batch


def _optimizer(params):
    import torch

    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01, eps=1e-6)


def _worker(degrees: dict[str, int], steps: int, global_batch: int, events: Any = None) -> dict | None:
    def say(*event: Any) -> None:
        if events is not None:
            events.put(event)

    import os

    import autoshard

    say("up", int(os.environ.get("RANK", "0")))
    mesh = autoshard.Mesh(**degrees)
    if mesh.rank == 0:
        say("mesh")
    model, lm_loss, batch = _setup()
    per = global_batch // mesh.data_size
    lo = mesh.data_rank * per
    x, _ = batch(0, global_batch, model.cfg)
    sm = autoshard.autoshard(model, mesh, example_inputs=(x[lo:lo + per],), loss_fn=lm_loss, optimizer=_optimizer)
    if mesh.rank == 0:
        say("plan", sm.plan.summary(), sm.plan.explain())
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = batch(step, global_batch, model.cfg)
        losses.append(sm.train_step((x[lo:lo + per],), y[lo:lo + per]))
        if mesh.rank == 0:
            say("step", step, losses[-1])
    elapsed = time.perf_counter() - t0
    sd = sm.full_state_dict()
    if mesh.rank != 0:
        return None
    return {"losses": losses, "state": sd, "summary": sm.plan.summary(), "explain": sm.plan.explain(),
            "stats": sm.stats(), "seconds": elapsed}


def _reference(steps: int, global_batch: int) -> tuple[list[float], dict]:
    model, lm_loss, batch = _setup()
    opt = _optimizer(model.parameters())
    losses = []
    for step in range(steps):
        x, y = batch(step, global_batch, model.cfg)
        loss = lm_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict()


def loss_plot(losses: list[float], width: int = 60, height: int = 8) -> str:
    """A small terminal plot of ``losses`` against the step: one column per step (or per group of steps)."""
    if not losses:
        return ""
    n = len(losses)
    cols = min(width, n)
    groups = [losses[i * n // cols:(i + 1) * n // cols] for i in range(cols)]
    values = [sum(g) / len(g) for g in groups]
    hi, lo = max(values), min(values)
    span = (hi - lo) or 1.0
    rows = [[" "] * cols for _ in range(height)]
    for c, v in enumerate(values):
        rows[round((hi - v) / span * (height - 1))][c] = "•"
    label = max(len(f"{hi:.3f}"), len(f"{lo:.3f}"))
    lines = []
    for r, row in enumerate(rows):
        y = f"{hi:.3f}" if r == 0 else f"{lo:.3f}" if r == height - 1 else ""
        lines.append(f"  {y:>{label}} │{''.join(row)}")
    lines.append(f"  {'':>{label}} └{'─' * cols}")
    steps = f"step 0{'':{max(1, cols - len('step 0') - len(str(n - 1)))}}{n - 1}"
    lines.append(f"  {'':>{label}}  {steps}")
    return "\n".join(lines)


class _Progress:
    """The demo's progress on one console: a spinner per phase in a terminal, and one line per finished
    phase (with its time) everywhere, so a log shows progress too."""

    def __init__(self, console) -> None:
        self.console = console
        self.t0 = time.perf_counter()
        self.since = self.t0
        self.status = console.status("", spinner="dots") if console.is_terminal else None
        if self.status is not None:
            self.status.start()

    def begin(self, text: str) -> None:
        """A new phase: the spinner's text in a terminal, a line elsewhere."""
        if self.status is None:
            self.console.print(f"  · {text}", soft_wrap=True, highlight=False)
        self.doing(text)

    def doing(self, text: str) -> None:
        if self.status is not None:
            self.status.update(f"[bold]{text}[/] ({time.perf_counter() - self.since:.0f} s)")

    def done(self, text: str) -> None:
        now = time.perf_counter()
        self.console.print(f"  [green]✓[/] {text} [dim]({now - self.since:.1f} s)[/]", soft_wrap=True,
                           highlight=False)
        self.since = now

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


def _launch(world: int, degrees: dict[str, int], steps: int, global_batch: int, console) -> dict:
    """Start the ranks on a thread and draw their progress here until rank 0's result comes back."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    events = multiprocessing.get_context("spawn").Queue()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            from autoshard.launch import launch

            box["result"] = launch(_worker, world, degrees, steps, global_batch, events, device="cpu")[0]
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    show = _Progress(console)
    up, phase, bar, task, train_t0 = 0, "ranks", None, None, 0.0
    show.begin(f"starting {world} ranks (new processes, each imports torch) 0/{world}")
    try:
        while thread.is_alive() or not events.empty():
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                if phase == "ranks":
                    show.doing(f"starting {world} ranks (new processes, each imports torch) {up}/{world}")
                elif phase == "mesh":
                    show.doing("joining the process group (Gloo) and building the mesh")
                elif phase == "capture":
                    show.doing("capturing (torch.export), planning, rewriting the graph")
                continue
            kind = event[0]
            if kind == "up":
                up += 1
                show.doing(f"starting {world} ranks (new processes, each imports torch) {up}/{world}")
                if up == world:
                    show.done(f"{world} ranks started")
                    show.begin("joining the process group (Gloo) and building the mesh")
                    phase = "mesh"
            elif kind == "mesh":
                if phase == "ranks":
                    show.done(f"{world} ranks started")
                show.done("process group joined (Gloo), mesh " + ", ".join(f"{k}={v}" for k, v in degrees.items()))
                show.begin("capturing (torch.export), planning, rewriting the graph")
                phase = "capture"
            elif kind == "plan":
                show.done("model captured (torch.export), planned, graph rewritten with collectives")
                show.stop()
                phase = "train"
                console.print(event[1], soft_wrap=True, highlight=False)
                console.print(PLAN_LEGEND, soft_wrap=True, highlight=False)
                train_t0 = time.perf_counter()
                bar = Progress(TextColumn("  [bold]training[/]"), BarColumn(), MofNCompleteColumn(),
                               TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=console)
                task = bar.add_task("train", total=steps, loss="-")
                bar.start()
            elif kind == "step" and bar is not None:
                bar.update(task, advance=1, loss=f"{event[2]:.4f}")
                if event[1] == steps - 1:
                    bar.stop()
                    bar = None
                    show = _Progress(console)
                    show.since = train_t0
                    show.done(f"trained {steps} steps")
                    show.begin("gathering the trained parameters on rank 0, stopping the ranks")
        thread.join()
        if "error" not in box:
            show.done("trained parameters gathered on rank 0, ranks stopped")
    finally:
        if bar is not None:
            bar.stop()
        show.stop()
    if "error" in box:
        raise box["error"]
    return box["result"]


def run(steps: int = 50, global_batch: int = 8, dp: int = 2, tp: int = 2, verbose: bool = False) -> int:
    """Run the demo; returns the process exit code (0 when parity holds)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    world = dp * tp
    console.print(f"[bold]autoshard demo[/]: GPT on {world} CPU ranks (dp={dp} × tp={tp}), {steps} steps, "
                  f"global batch {global_batch}")
    result = _launch(world, {"dp": dp, "tp": tp}, steps, global_batch, console)
    if verbose:
        console.print(result["explain"], highlight=False)
    with console.status("single-process reference run"):
        ref_losses, ref_state = _reference(steps, global_batch)
    loss_dev = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], ref_losses))
    param_dev = {k: float((result["state"][k] - v).norm() / v.norm().clamp_min(1e-12))
                 for k, v in ref_state.items() if v.norm() > 0}
    worst = max(param_dev, key=param_dev.get)

    table = Table(title="loss (mean over the global batch)")
    table.add_column("step", justify="right")
    table.add_column("autoshard", justify="right")
    table.add_column("1 process", justify="right")
    for i in sorted({0, 1, 2, steps // 2, steps - 2, steps - 1}):
        if 0 <= i < steps:
            table.add_row(str(i), f"{result['losses'][i]:.6f}", f"{ref_losses[i]:.6f}")
    console.print(table)
    console.print("loss per step (autoshard; the one-process curve lies on it):")
    console.print(loss_plot(result["losses"]), highlight=False)
    console.print(f"loss {result['losses'][0]:.4f} → {result['losses'][-1]:.4f} in {result['seconds']:.1f}s; "
                  f"{result['stats']['comm_bytes_per_step'] / 2**20:.2f} MiB sent per step by rank 0")
    ok = loss_dev <= LOSS_TOL and param_dev[worst] <= PARAM_TOL
    verdict = "[green]PARITY OK[/]" if ok else "[red]PARITY FAILED[/]"
    console.print(f"{verdict}: worst loss deviation {loss_dev:.2e} (bound {LOSS_TOL:g}), worst parameter "
                  f"deviation {param_dev[worst]:.2e} in {worst} (bound {PARAM_TOL:g})")
    return 0 if ok else 1

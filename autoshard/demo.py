"""``autoshard demo``: a small GPT trained on 4 CPU ranks (dp=2 × tp=2), checked against one process.

What it shows: the plan autoshard chose, the loss curve, and the worst deviation of the sharded
run from the unmodified model trained on one process with the same global batches. Exits non-zero
if the deviation breaks the parity bound.
"""

from __future__ import annotations

import time

import torch

LOSS_TOL = 1e-4  # relative, per step, after many AdamW steps (contract 1 is 1e-5 over 5 steps)
PARAM_TOL = 1e-3  # relative, per parameter, AdamW


def _setup():
    from autoshard.examples.gpt import lm_loss, make_model, synthetic_batch

    model = make_model(vocab_size=256, seq_len=64, d_model=128, n_heads=4, d_ff=512, n_layers=2)
    return model, lm_loss, synthetic_batch


def _optimizer(params):
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01, eps=1e-6)


def _worker(degrees: dict[str, int], steps: int, global_batch: int) -> dict | None:
    import autoshard

    mesh = autoshard.Mesh(**degrees)
    model, lm_loss, batch = _setup()
    per = global_batch // mesh.data_size
    lo = mesh.data_rank * per
    x, _ = batch(0, global_batch, model.cfg)
    sm = autoshard.autoshard(model, mesh, example_inputs=(x[lo:lo + per],), loss_fn=lm_loss, optimizer=_optimizer)
    losses = []
    t0 = time.perf_counter()
    if mesh.rank == 0:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("[bold]training[/] {task.completed}/{task.total}"), BarColumn(),
                            TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
        task = progress.add_task("train", total=steps, loss="-")
        progress.start()
    for step in range(steps):
        x, y = batch(step, global_batch, model.cfg)
        losses.append(sm.train_step((x[lo:lo + per],), y[lo:lo + per]))
        if mesh.rank == 0:
            progress.update(task, advance=1, loss=f"{losses[-1]:.4f}")
    elapsed = time.perf_counter() - t0
    if mesh.rank == 0:
        progress.stop()
    sd = sm.full_state_dict()
    if mesh.rank != 0:
        return None
    return {"losses": losses, "state": sd, "summary": sm.plan.summary(), "explain": sm.plan.explain(),
            "stats": sm.stats(), "seconds": elapsed}


def _reference(steps: int, global_batch: int) -> tuple[list[float], dict[str, torch.Tensor]]:
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


def run(steps: int = 50, global_batch: int = 8, dp: int = 2, tp: int = 2, verbose: bool = False) -> int:
    """Run the demo; returns the process exit code (0 when parity holds)."""
    from rich.console import Console
    from rich.table import Table

    import autoshard

    console = Console()
    world = dp * tp
    console.print(f"[bold]autoshard demo[/]: GPT on {world} CPU ranks (dp={dp} × tp={tp}), {steps} steps, "
                  f"global batch {global_batch}")
    result = autoshard.launch(_worker, world, {"dp": dp, "tp": tp}, steps, global_batch, device="cpu")[0]
    console.print(result["explain"] if verbose else result["summary"])
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
    console.print(f"loss {result['losses'][0]:.4f} → {result['losses'][-1]:.4f} in {result['seconds']:.1f}s; "
                  f"{result['stats']['comm_bytes_per_step'] / 2**20:.2f} MiB sent per step by rank 0")
    ok = loss_dev <= LOSS_TOL and param_dev[worst] <= PARAM_TOL
    verdict = "[green]PARITY OK[/]" if ok else "[red]PARITY FAILED[/]"
    console.print(f"{verdict}: worst loss deviation {loss_dev:.2e} (bound {LOSS_TOL:g}), worst parameter "
                  f"deviation {param_dev[worst]:.2e} in {worst} (bound {PARAM_TOL:g})")
    return 0 if ok else 1

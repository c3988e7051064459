"""Updates/s of the CQL and fine-tuning updates against the machine's matmul speed.

    python benchmarks/bench_updates.py                    # CPU
    python benchmarks/bench_updates.py --device cuda      # GPU

Each measurement runs in a fresh process (so its peak memory is its own) holding a synthetic
1M-transition dataset of Hopper's shapes; the update is the scripts' own function, nothing
re-implemented here. FLOPs are counted analytically from the layer shapes (2 per multiply-add;
backward = 2x forward for a trained layer, 1x for a frozen layer that passes gradients through).
Writes one CSV row per measurement to --out.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import plumbing  # noqa: E402  (the scripts' run plumbing, beside them)

OBS_DIM, ACT_DIM = 11, 3  # Hopper
COLUMNS = ["name", "device", "num_agents", "updates_per_s", "gflop_per_update", "gflops_per_s",
           "fraction_of_matmul", "peak_mem_mib"]


@dataclass
class Args:
    device: Literal["cpu", "cuda"] = "cpu"
    """where the updates run"""
    steps: int = 0
    """timed updates per measurement (0: 30 on CPU, 500 on GPU)"""
    warmup: int = 0
    """untimed updates first (0: 3 on CPU, 50 on GPU; torch.compile compiles here)"""
    min_seconds: float = 0
    """time whole rounds of --steps updates until at least this long;
    0: 10 s on CPU, 2 s on GPU (a shared CPU's speed drifts)"""
    dataset_size: int = 1_000_000
    """transitions of the synthetic offline dataset held in memory"""
    hidden_sizes: tuple[int, ...] = (256, 256)
    """hidden layers of all networks"""
    batch_size: int = 256
    """minibatch size"""
    out: str = "benchmarks/results.csv"
    """CSV written here"""
    only: str | None = None
    """internal: run one measurement here and print JSON;
    one of matmul, cql:N, cql_eager:N, cql_compiled:N, off2on:N, upq:N"""


def mlp_macs(in_dim: int, hidden: tuple[int, ...], out_dim: int) -> int:
    widths = [in_dim, *hidden, out_dim]
    return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def cql_flops(num_agents: int, hidden, batch: int, num_random: int = 10) -> float:
    """FLOPs of one CQL step of N agents (matmuls only)."""
    actor = mlp_macs(OBS_DIM, hidden, 2 * ACT_DIM)
    critic = mlp_macs(OBS_DIM + ACT_DIM, hidden, 1)
    per_agent = (
        2 * actor * (2 * batch) * 3  # actor at s and s', trained
        + 2 * critic * 2 * (1 + 3 * num_random) * batch * 3  # both critics on data + 3R sampled actions, trained
        + 2 * critic * 2 * batch * 2  # frozen critics in the actor loss, gradient to the actions
        + 2 * critic * 2 * batch  # target critics, forward only
    )
    return num_agents * per_agent


def finetune_flops(num_agents: int, hidden, batch: int) -> float:
    """FLOPs of one fine-tuning step (ensemble of N agents + density-ratio network)."""
    actor = mlp_macs(OBS_DIM, hidden, 2 * ACT_DIM)
    critic = mlp_macs(OBS_DIM + ACT_DIM, hidden, 1)
    ratio = mlp_macs(OBS_DIM + ACT_DIM, hidden, 1)
    return (
        num_agents * 2 * actor * batch * 3  # N actors at s, trained
        + num_agents * 2 * actor * batch  # N actors at s', forward only (the target's action)
        + 2 * num_agents * 2 * critic * batch * 3  # 2N critics on the batch, trained
        + 2 * num_agents * 2 * critic * batch * 2  # frozen critics in the actor loss
        + 2 * num_agents * 2 * critic * batch  # target critics
        + 2 * ratio * (2 * batch) * 3  # density-ratio net on offline + online samples, trained
        + 2 * ratio * batch  # priorities of the sampled batch, forward only
    )


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mib(device) -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    if device.type == "cuda":
        return rss + torch.cuda.max_memory_allocated() / 2**20
    return rss


def time_it(step, device, warmup: int, steps: int, min_seconds: float) -> float:
    """Calls/s of step(i) over rounds of `steps` calls, as many rounds as fill `min_seconds` (at least one)."""
    for i in range(warmup):
        step(i)
    synchronize(device)
    start, done = time.perf_counter(), 0
    while done == 0 or time.perf_counter() - start < min_seconds:
        for i in range(steps):
            step(warmup + done + i)
        done += steps
        synchronize(device)
    return done / (time.perf_counter() - start)


def measure_matmul(args, device, num_agents: int = 4):
    """Batched fp32 matmuls of the CQL critics' hidden layer: [2N, 31 B, H] x [2N, H, H]."""
    width = args.hidden_sizes[-1]
    rows = (1 + 3 * 10) * args.batch_size
    x = torch.randn(2 * num_agents, rows, width, device=device)
    w = torch.randn(2 * num_agents, width, width, device=device)
    repeat = 20 if device.type == "cpu" else 200
    rate = max(time_it(lambda i: torch.bmm(x, w), device, 3, repeat, args.min_seconds / 3) for _ in range(3))  # ceiling
    flops = 2.0 * 2 * num_agents * rows * width * width
    return dict(updates_per_s=rate, gflop_per_update=flops / 1e9)


def synthetic_dataset(size: int, device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    data = {
        "observations": torch.randn(size, OBS_DIM, generator=generator),
        "actions": torch.rand(size, ACT_DIM, generator=generator) * 2 - 1,
        "rewards": torch.randn(size, generator=generator),
        "next_observations": torch.randn(size, OBS_DIM, generator=generator),
        "terminals": (torch.rand(size, generator=generator) < 0.001).float(),
    }
    return {key: value.to(device) for key, value in data.items()}


def measure_cql(args, device, num_agents: int, compile_losses: bool = False, graph: bool = True):
    """The CQL step as cql_pretrain.py runs it: on CUDA replayed as a CUDA graph unless graph=False
    (--no-cuda-graph)."""
    import cql_pretrain as cql

    hidden = tuple(args.hidden_sizes)
    actor, critic = cql.make_agents(OBS_DIM, ACT_DIM, hidden, num_agents, seed=1)
    actor, critic = actor.to(device), critic.to(device)
    target_critic = cql.Critic(OBS_DIM, ACT_DIM, hidden, 2 * num_agents).to(device)
    target_critic.load_state_dict(critic.state_dict())
    target_critic.requires_grad_(False)
    log_alpha = torch.zeros(num_agents, device=device, requires_grad=True)
    adam = dict(fused=True, capturable=device.type == "cuda")
    optimizers = {
        "actor": torch.optim.Adam(actor.parameters(), lr=1e-4, **adam),
        "critic": torch.optim.Adam(critic.parameters(), lr=3e-4, **adam),
        "alpha": torch.optim.Adam([log_alpha], lr=1e-4, **adam),
    }
    loss_args = cql.cql_hyperparameters(dataclasses.replace(cql.Algorithm(), target_entropy=-float(ACT_DIM)))
    data = synthetic_dataset(args.dataset_size, device)
    generators = [torch.Generator(device=device).manual_seed(k) for k in range(num_agents)]

    losses = torch.compile(cql.cql_losses) if compile_losses else cql.cql_losses

    def eager():
        batch = cql.sample_batch(data, generators, args.batch_size)
        noise = cql.draw_noise(generators, args.batch_size, ACT_DIM, loss_args["num_random"], device)
        return cql.cql_update(actor, critic, target_critic, log_alpha, None, optimizers, batch, noise, False,
                              5e-3, loss_args, losses)

    step = eager
    if graph and device.type == "cuda":
        for _ in range(plumbing.CUDA_GRAPH_WARMUP):
            eager()
        step = plumbing.cuda_graphed(eager, generators)
    rate = time_it(lambda i: step(), device, args.warmup, args.steps, args.min_seconds)
    return dict(updates_per_s=rate, gflop_per_update=cql_flops(num_agents, hidden, args.batch_size) / 1e9)


def measure_finetune(args, device, num_agents: int, script: str):
    """One fine-tuning update with balanced replay (sampling, density-ratio step, priority update included).

    The ensemble is freshly initialised (no checkpoints needed; the cost does not depend on the weights); the
    online buffer holds 10k transitions. On CUDA the update is replayed as a CUDA graph, as the script does.
    """
    module = __import__(script)
    hidden = tuple(args.hidden_sizes)
    torch.manual_seed(0)
    actor = module.Actor(OBS_DIM, ACT_DIM, hidden, num_agents).to(device)
    critic = module.Critic(OBS_DIM, ACT_DIM, hidden, 2 * num_agents).to(device)
    target_critic = module.Critic(OBS_DIM, ACT_DIM, hidden, 2 * num_agents).to(device)
    target_critic.load_state_dict(critic.state_dict())
    target_critic.requires_grad_(False)
    density_ratio = module.DensityRatio(OBS_DIM + ACT_DIM, hidden).to(device)
    log_alpha = torch.zeros(1, device=device, requires_grad=True)
    adam = dict(fused=True, capturable=device.type == "cuda")
    optimizers = {
        "alpha": torch.optim.Adam([log_alpha], lr=3e-4, **adam),
        "actor": torch.optim.Adam(actor.parameters(), lr=3e-4, **adam),
        "critic": torch.optim.Adam(critic.parameters(), lr=3e-4, **adam),
        "density_ratio": torch.optim.Adam(density_ratio.parameters(), lr=3e-4, **adam),
    }
    algorithm = dataclasses.replace(module.Algorithm(), target_entropy=-float(ACT_DIM), batch_size=args.batch_size)
    data = synthetic_dataset(args.dataset_size, "cpu")
    rows = module.pack_transitions(*(data[key].numpy() for key in ("observations", "actions", "rewards",
                                                                   "next_observations", "terminals")))
    del data
    replay = module.BalancedReplay(torch.as_tensor(rows, device=device), algorithm.online_buffer_size, True,
                                   module.initial_online_priority(len(rows), 0.5, 1000))
    replay.add(torch.as_tensor(rows[:10_000], device=device))
    del rows
    generator = torch.default_generator if device.type == "cpu" else torch.cuda.default_generators[0]
    nets = {"actor": actor, "critic": critic, "target_critic": target_critic, "log_alpha": log_alpha,
            "density_ratio": density_ratio}

    def eager():
        return module.finetune_update(nets, optimizers, replay, generator, algorithm.batch_size, algorithm.tau,
                                      algorithm.priority_temperature, module.loss_hyperparameters(algorithm),
                                      num_agents, ACT_DIM)

    step = eager
    if device.type == "cuda":
        for _ in range(plumbing.CUDA_GRAPH_WARMUP):
            eager()
        step = plumbing.cuda_graphed(eager)
    rate = time_it(lambda i: step(), device, args.warmup, args.steps, args.min_seconds)
    return dict(updates_per_s=rate, gflop_per_update=finetune_flops(num_agents, hidden, args.batch_size) / 1e9)


MEASUREMENTS = {
    "matmul": measure_matmul,
    "cql": measure_cql,
    "cql_eager": lambda args, device, n: measure_cql(args, device, n, graph=False),
    "cql_compiled": lambda args, device, n: measure_cql(args, device, n, compile_losses=True),
    "off2on": lambda args, device, n: measure_finetune(args, device, n, "off2on_finetune"),
    "upq": lambda args, device, n: measure_finetune(args, device, n, "upq_finetune"),
}


def run_one(args: Args) -> None:
    device = torch.device(args.device)
    name, _, agents = args.only.partition(":")
    result = MEASUREMENTS[name](args, device, int(agents)) if agents else MEASUREMENTS[name](args, device)
    result["peak_mem_mib"] = peak_memory_mib(device)
    print(json.dumps(result))


def main(args: Args) -> None:
    cpu = args.device == "cpu"
    args.steps = args.steps or (30 if cpu else 500)
    args.warmup = args.warmup or (3 if cpu else 50)
    args.min_seconds = args.min_seconds or (10.0 if cpu else 2.0)
    if args.only:
        return run_one(args)
    plan = [("matmul", 4), ("cql", 1), ("cql", 4), ("cql_compiled", 4), ("off2on", 4), ("upq", 4)]
    if args.device == "cuda":  # "cql" replays a CUDA graph there; this row is the same step launched op by op
        plan.insert(3, ("cql_eager", 4))
    rows, probe = [], None
    for name, agents in plan:
        command = [sys.executable, __file__, "--only", name if name == "matmul" else f"{name}:{agents}",
                   "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--min-seconds", str(args.min_seconds), "--dataset-size", str(args.dataset_size),
                   "--batch-size", str(args.batch_size),
                   "--hidden-sizes", *map(str, args.hidden_sizes)]
        output = subprocess.run(command, capture_output=True, text=True)
        if output.returncode != 0:
            raise SystemExit(f"error: measurement {name} failed:\n{output.stderr}")
        result = json.loads(output.stdout.strip().splitlines()[-1])
        gflops = result["updates_per_s"] * result["gflop_per_update"]
        probe = gflops if name == "matmul" else probe
        rows.append(dict(name=name, device=args.device, num_agents=agents,
                         updates_per_s=round(result["updates_per_s"], 2),
                         gflop_per_update=round(result["gflop_per_update"], 3), gflops_per_s=round(gflops, 1),
                         fraction_of_matmul=round(gflops / probe, 3), peak_mem_mib=round(result["peak_mem_mib"])))
        print(" ".join(f"{key}={value}" for key, value in rows[-1].items()), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    widths = {key: max(len(key), *(len(str(row[key])) for row in rows)) for key in COLUMNS}
    print("\n" + "  ".join(key.ljust(widths[key]) for key in COLUMNS))
    for row in rows:
        print("  ".join(str(row[key]).ljust(widths[key]) for key in COLUMNS))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))

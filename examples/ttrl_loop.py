"""Test-Time RL on a toy task, recorded with TTRLContext: experiences, updates, checkpoints.

    python examples/ttrl_loop.py [--root DIR] [--updates 300] [--checkpoint-every 50]

The task: answer ``a + b`` for digits a, b, choosing among the 19 possible sums. A tiny
policy (one row of logits per two-token prompt) is first trained briefly on labels of which
20 % are wrong, so its samples are right only about 40 % of the time while the most frequent
sample is right about 80 % of the time. Then, as in TTRL (Zuo et al., 2025), it keeps
learning at test time *without labels*: for each incoming prompt it samples K answers, takes
the most frequent one as the pseudo-label (majority vote), rewards the samples that agree with
it, and makes one REINFORCE step with a KL penalty to the initial policy. Sample accuracy
rises towards the majority-vote accuracy, which is the ceiling of this reward. The true sums
are used only to print accuracy, never to train.

Every prompt is a ``log_experience`` (prompt, samples, pseudo-label), every step a
``log_online_update`` (mean reward, confidence = majority fraction, KL) linked to the model
version in force, and every ``--checkpoint-every`` steps the weights become a checkpoint. At
the end the script asks the store which updates produced the last checkpoint.
Runs on CPU in a few seconds; everything is synthetic and local.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from collections import Counter, deque
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from repro_core import ArtifactManager
from repro_core.ttrl import TTRLContext

N_DIGITS = 10
N_ANSWERS = 2 * N_DIGITS - 1  # sums 0..18
PROBLEMS = [(a, b) for a in range(N_DIGITS) for b in range(N_DIGITS)]


class AdderPolicy(nn.Module):
    """p(answer | a, b): one row of logits per prompt (the two tokens index the row).

    No parameters are shared between prompts on purpose: with a shared MLP at this scale the
    majority-vote reward quickly collapses every prompt onto one global answer (reward 1,
    accuracy 10 %) - the reward hacking the KL term is there to slow down.
    """

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Embedding(N_DIGITS * N_DIGITS, N_ANSWERS)
        nn.init.zeros_(self.logits.weight)  # uniform before pretraining

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.logits(a * N_DIGITS + b)


def pretrain(policy: AdderPolicy, steps: int, lr: float, noise: float, seed: int) -> None:
    """A short supervised phase on partly wrong labels: the base model is right sometimes."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.tensor([p[0] for p in PROBLEMS])
    b = torch.tensor([p[1] for p in PROBLEMS])
    wrong = torch.rand(len(PROBLEMS), generator=generator) < noise
    labels = torch.where(wrong, torch.randint(0, N_ANSWERS, (len(PROBLEMS),),
                                              generator=generator), a + b)
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(policy(a, b), labels).backward()
        optimizer.step()


@torch.no_grad()
def evaluate(policy: AdderPolicy, k: int) -> dict[str, float]:
    """Accuracy of the greedy answer, of one sample, and of the majority of ``k`` samples, over
    all 100 problems (uses the true sums: reporting only)."""
    a = torch.tensor([p[0] for p in PROBLEMS])
    b = torch.tensor([p[1] for p in PROBLEMS])
    probs = F.softmax(policy(a, b), dim=-1)
    truth = a + b
    samples = torch.multinomial(probs, k, replacement=True)
    majority = torch.mode(samples, dim=-1).values
    return {"greedy_accuracy": (probs.argmax(-1) == truth).float().mean().item(),
            "sample_accuracy": (samples == truth[:, None]).float().mean().item(),
            "majority_accuracy": (majority == truth).float().mean().item()}


def ttrl_step(policy: AdderPolicy, reference: AdderPolicy, optimizer: torch.optim.Optimizer,
              prompt: tuple[int, int], k: int, beta: float) -> dict[str, Any]:
    """One unlabeled prompt: sample K answers, majority-vote reward, REINFORCE + KL step.

    The mean reward equals the majority fraction (the confidence) by construction; both are
    logged because TTRLContext records them separately for other reward functions."""
    a, b = torch.tensor([prompt[0]]), torch.tensor([prompt[1]])
    logits = policy(a, b)[0]
    log_probs = F.log_softmax(logits, dim=-1)
    samples = torch.multinomial(log_probs.exp().detach(), k, replacement=True)
    votes = Counter(samples.tolist())
    pseudo_label, count = votes.most_common(1)[0]
    rewards = (samples == pseudo_label).float()
    advantages = rewards - rewards.mean()  # group baseline, as in GRPO-style TTRL
    with torch.no_grad():
        ref_log_probs = F.log_softmax(reference(a, b)[0], dim=-1)
    kl = torch.sum(log_probs.exp() * (log_probs - ref_log_probs))
    loss = -(advantages * log_probs[samples]).mean() + beta * kl
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"samples": samples.tolist(), "pseudo_label": pseudo_label,
            "reward": rewards.mean().item(), "confidence": count / k, "kl": kl.item()}


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    policy = AdderPolicy()
    pretrain(policy, args.pretrain_steps, lr=0.05, noise=args.label_noise, seed=args.seed)
    reference = AdderPolicy()
    reference.load_state_dict(policy.state_dict())
    reference.requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    before = evaluate(policy, args.k)
    print(f"before TTRL: {_fmt(before)}")

    config = {key: value for key, value in vars(args).items() if key != "root"}
    buffer: deque[dict[str, Any]] = deque(maxlen=256)
    checkpoints: list[str] = []
    # Checkpoint files are scratch: once logged, the store holds them (removed at the end).
    with tempfile.TemporaryDirectory(prefix="ttrl-ckpt-") as scratch, \
            TTRLContext(config=config, root=args.root, monitor_interval=1.0,
                        experience_snapshot_interval=args.snapshot_interval) as ctx:
        ckpt_dir = Path(scratch)
        for step in range(1, args.updates + 1):
            prompt = rng.choice(PROBLEMS)
            out = ttrl_step(policy, reference, optimizer, prompt, args.k, args.beta)
            exp_id = f"prompt-{step:05d}"
            ctx.log_experience(exp_id, {"a": prompt[0], "b": prompt[1]},
                               {"samples": out["samples"], "pseudo_label": out["pseudo_label"]},
                               metadata={"truth": sum(prompt)})  # kept for analysis only
            ctx.log_online_update(exp_id, out["reward"], out["confidence"], out["kl"],
                                  metadata={"pseudo_label": out["pseudo_label"]})
            buffer.append({"id": exp_id, "prompt": prompt, "label": out["pseudo_label"]})
            ctx.log_experience_buffer(list(buffer))  # only when the interval has passed
            if step % args.checkpoint_every == 0:
                checkpoints.append(checkpoint(ctx, policy, ckpt_dir, step, args.k))
        snapshot = ctx.log_experience_buffer(list(buffer), force=True)
        if snapshot is not None:
            print(f"experience buffer: {snapshot.key} ({len(buffer)} latest experiences)")
        report(ctx, checkpoints)
        run_id = ctx.run.id if ctx.run else None
    after = evaluate(policy, args.k)
    print(f"after TTRL:  {_fmt(after)}")
    state = ArtifactManager().get_run(run_id)["state"] if run_id else "?"
    print(f"run {run_id}: {state}; store {ArtifactManager().root}")


def checkpoint(ctx: TTRLContext, policy: AdderPolicy, directory: Path, step: int,
               k: int) -> str:
    """Save the weights (safetensors) and log them; later updates link to this version."""
    path = directory / f"policy-{step:05d}.safetensors"
    save_file({name: t.detach().contiguous() for name, t in policy.state_dict().items()},
              str(path))
    scores = evaluate(policy, k)
    ctx.log_metrics({f"eval/{name}": value for name, value in scores.items()}, step=step)
    agg = ctx.aggregates()
    meta = ctx.log_model_checkpoint(path, step, metrics={
        "mean_reward": agg["mean_reward"], "mean_confidence": agg["mean_confidence"], **scores})
    print(f"step {step:4d}: {meta.key}  mean reward {agg['mean_reward']:.3f}  "
          f"confidence {agg['mean_confidence']:.3f}  {_fmt(scores)}")
    return meta.key


def report(ctx: TTRLContext, checkpoints: list[str]) -> None:
    """Ask the store which updates produced the last checkpoint, and summarise the run."""
    if checkpoints:
        last = checkpoints[-1]
        previous = checkpoints[-2] if len(checkpoints) > 1 else None
        made = ctx.updates_producing(last)  # the updates made on the model that preceded it
        ids = [u["update_id"].rsplit("-", 1)[1] for u in made]
        span = f"{ids[0]}..{ids[-1]}" if ids else "none"
        print(f"{last} was produced by {len(made)} updates ({span}) made on "
              f"{previous or 'the initial policy'}")
        print(f"updates made after {last}: {len(ctx.updates_for(last))}")
    stored = sum(len(ctx.updates_for(key)) for key in [None, *checkpoints])
    print(f"stored: {len(ctx.experiences())} experiences, {stored} online updates")
    agg = ctx.aggregates()
    print("aggregates: " + ", ".join(
        f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
        for key, value in agg.items()))


def _fmt(scores: dict[str, float]) -> str:
    return "  ".join(f"{key} {value:.2f}" for key, value in scores.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--root", type=Path, default=None,
                        help="store root (default: $REPRO_HOME or ./repro_store)")
    parser.add_argument("--updates", type=int, default=400, help="prompts = online updates")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--k", type=int, default=16, help="samples per prompt")
    parser.add_argument("--beta", type=float, default=0.05, help="KL weight")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--pretrain-steps", type=int, default=30)
    parser.add_argument("--label-noise", type=float, default=0.2,
                        help="fraction of wrong labels in pretraining")
    parser.add_argument("--snapshot-interval", type=float, default=2.0,
                        help="seconds between experience-buffer snapshots")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.updates < 1 or args.checkpoint_every < 1 or args.k < 1:
        parser.error("--updates, --checkpoint-every and --k must be >= 1")
    args.root = (args.root or ArtifactManager().root).absolute()
    run(args)


if __name__ == "__main__":
    main()

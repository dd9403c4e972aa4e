"""Quickstart: log a dataset, a config and a model, use them in a second run, verify the store.

    python examples/quickstart.py [--root DIR]

The store is ``./repro_store`` (or ``$REPRO_HOME``, or ``--root``), so ``repro runs`` run from
the same directory shows the two runs afterwards. Everything is synthetic and local; nothing is
downloaded, and the scratch data directory is removed at the end.
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
from pathlib import Path

import torch

from repro_core import ArtifactManager, verify_store


def train_run(manager: ArtifactManager, root: Path, data_dir: Path) -> None:
    """Run 1: record inputs and the trained weights; lineage links them."""
    config = {"lr": 0.05, "epochs": 20, "hidden": 16}
    run = manager.init_run("train", config=config, project="quickstart", root=root)
    dataset = manager.log_artifact("toy-regression", "dataset", file_path=data_dir)
    cfg = manager.log_artifact("train-config", "config", data=config)

    data = torch.load(data_dir / "data.pt")
    model = torch.nn.Sequential(torch.nn.Linear(4, config["hidden"]), torch.nn.Tanh(),
                                torch.nn.Linear(config["hidden"], 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    for _ in range(config["epochs"]):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(data["x"]), data["y"])
        loss.backward()
        optimizer.step()

    weights = manager.log_artifact(
        "toy-model", "model", data=model.state_dict(), metadata={"final_loss": loss.item()},
        parent_artifacts=[dataset.key, cfg.key], aliases=["candidate"],
    )
    manager.finalize_run()
    print(f"run {run.id}: logged {dataset.key}, {cfg.key}, {weights.key} "
          f"(loss {loss.item():.4f})")


def eval_run(manager: ArtifactManager) -> None:
    """Run 2: consume the model by alias; the registry records the used-by edge."""
    run = manager.init_run("evaluate", project="quickstart")
    weights = manager.use_artifact("toy-model:candidate")  # size + digest verified
    state = manager.load_artifact("toy-model:candidate")
    print(f"run {run.id}: loaded {weights.key} ({weights.size_bytes} bytes, {len(state)} tensors)"
          f" from {weights.path}")
    manager.log_artifact("toy-eval", "evaluation", data={"n_params": sum(t.numel() for t in
                         state.values())}, parent_artifacts=[weights.key])
    manager.finalize_run()


def make_data(directory: Path) -> Path:
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(256, 1)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "y": y}, directory / "data.pt")
    (directory / "README.txt").write_text("y = x @ w + noise, 256 rows\n")
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None,
                        help="store root (default: $REPRO_HOME or ./repro_store)")
    args = parser.parse_args()
    manager = ArtifactManager()
    root = (args.root or manager.root).absolute()

    with tempfile.TemporaryDirectory(prefix="repro-quickstart-data-") as work:
        train_run(manager, root, make_data(Path(work) / "toy"))
    eval_run(manager)

    lineage = manager.get_lineage("toy-eval")
    print(f"lineage of toy-eval: parents={lineage['parents']} "
          f"produced_by={lineage['produced_by']['name']}")
    report = verify_store(root)
    print(f"verify: {report.blobs_checked} blobs, {report.bytes_checked} bytes, "
          f"{'OK' if report.ok else 'PROBLEMS: ' + str(report.problems)}")
    print(f"store: {root}  (registry.sqlite, blobs/, runs/<id>/run.json)")
    print(f"look at it: repro runs --root {shlex.quote(str(root))}")
    if not report.ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

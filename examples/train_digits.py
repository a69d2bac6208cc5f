#!/usr/bin/env python3
"""Train a small MLP on scikit-learn's bundled digits data and watch VCI fall.

The network (64 -> 64 -> 32 -> 10, ReLU, softmax) is written in numpy, so the
example needs only numpy, scikit-learn and the vcid package. After every
epoch (epoch 0 is the untrained network) it pushes the 32-dimensional
penultimate features of the training split and of a held-out split to the
daemon, closes both epochs and prints accuracy and VCI side by side.

    pip install ./python scikit-learn
    python examples/train_digits.py                 # starts its own daemon
    python examples/train_digits.py --address 127.0.0.1:50051

Without --address it starts `vcid serve` on free loopback ports with a
temporary data directory (the package's own `vcid` command, or $VCID_BIN),
and stops it at the end.
Exits with status 1 if the training VCI did not fall clearly (to half of its
starting value or less), so CI notices when the example stops showing what
it is meant to show.
"""

from __future__ import annotations

import argparse
import sys
import uuid

import numpy as np

import vcid
from vcid.local import LocalDaemon, find_vcid

class MLP:
    """64 -> hidden -> penultimate -> 10 with ReLU; He initialisation;
    mini-batch SGD with momentum on softmax cross-entropy."""

    def __init__(self, sizes, rng):
        self.weights = [rng.normal(0, np.sqrt(2.0 / a), size=(a, b))
                        for a, b in zip(sizes[:-1], sizes[1:])]
        self.biases = [np.zeros(b) for b in sizes[1:]]
        self.velocity = [np.zeros_like(p) for p in self.weights + self.biases]

    def forward(self, x):
        """Activations of every layer; the last entry is the logits."""
        acts = [x]
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            z = acts[-1] @ w + b
            acts.append(z if i == len(self.weights) - 1 else np.maximum(z, 0.0))
        return acts

    def penultimate(self, x):
        return self.forward(x)[-2]

    def predict(self, x):
        return self.forward(x)[-1].argmax(axis=1)

    def step(self, x, y, lr, momentum=0.9, weight_decay=1e-4):
        acts = self.forward(x)
        logits = acts[-1]
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad = p
        grad[np.arange(len(y)), y] -= 1.0
        grad /= len(y)
        grads_w, grads_b = [], []
        for i in reversed(range(len(self.weights))):
            grads_w.append(acts[i].T @ grad + weight_decay * self.weights[i])
            grads_b.append(grad.sum(axis=0))
            if i:
                grad = (grad @ self.weights[i].T) * (acts[i] > 0)
        grads = grads_w[::-1] + grads_b[::-1]
        params = self.weights + self.biases
        for param, g, v in zip(params, grads, self.velocity):
            v *= momentum
            v -= lr * g
            param += v


def load_data(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float64) / 16.0
    return train_test_split(x, digits.target, test_size=0.25, random_state=seed,
                            stratify=digits.target)


def push_split(mon, model, x, y, epoch, split, batch=256):
    for start in range(0, len(y), batch):
        mon.push(model.penultimate(x[start:start + batch]), y[start:start + batch],
                 epoch=epoch, split=split)


def run(address, args):
    x_train, x_val, y_train, y_val = load_data(args.seed)
    rng = np.random.default_rng(args.seed)
    model = MLP([64, args.hidden, args.penultimate, 10], rng)
    run_id = args.run or f"digits-mlp-{uuid.uuid4().hex[:8]}"
    rows = []
    with vcid.Monitor(run_id, num_classes=10, feature_dim=args.penultimate, address=address,
                      metadata={"model": "mlp-64-32", "dataset": "sklearn-digits"}) as mon:
        print(f"run {run_id} on {address}: {len(y_train)} train / {len(y_val)} held-out "
              f"samples, penultimate dimension {args.penultimate}")
        header = (f"{'epoch':>5}  {'acc_train':>9}  {'acc_val':>7}  {'vci_train':>9}  "
                  f"{'vci_val':>7}")
        print(header)
        print("-" * len(header))
        for epoch in range(args.epochs + 1):
            if epoch:  # epoch 0 is the untrained network
                order = rng.permutation(len(y_train))
                for start in range(0, len(order), args.batch_size):
                    idx = order[start:start + args.batch_size]
                    model.step(x_train[idx], y_train[idx], args.lr)
            push_split(mon, model, x_train, y_train, epoch, "train")
            push_split(mon, model, x_val, y_val, epoch, "val")
            train = mon.close_epoch(epoch, split="train")
            val = mon.close_epoch(epoch, split="val")
            acc_train = float((model.predict(x_train) == y_train).mean())
            acc_val = float((model.predict(x_val) == y_val).mean())
            rows.append((epoch, acc_train, acc_val, train.vci, val.vci))
            print(f"{epoch:>5}  {acc_train:>9.3f}  {acc_val:>7.3f}  {_fmt(train.vci):>9}  "
                  f"{_fmt(val.vci):>7}", flush=True)
        history = mon.history(split=None)
    assert len(history) == 2 * (args.epochs + 1)
    first, last = rows[0][3], rows[-1][3]
    print(f"\ntrain VCI {_fmt(first)} -> {_fmt(last)} over {args.epochs} epochs "
          f"(held-out {_fmt(rows[0][4])} -> {_fmt(rows[-1][4])})")
    if first is None or last is None or not last <= 0.5 * first:
        print("error: the training VCI did not fall to half of its starting value",
              file=sys.stderr)
        return 1
    return 0


def _fmt(value):
    return "n/a" if value is None else f"{value:.4f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", help="gRPC address of a running daemon "
                                          "(default: start one on loopback)")
    parser.add_argument("--run", help="run id (default: digits-mlp-<random>)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--penultimate", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.address:
        return run(args.address, args)
    command = find_vcid()
    with LocalDaemon(command) as daemon:
        print(f"started {' '.join(command)} serve on {daemon.address} "
              f"(data in {daemon.data_dir})")
        return run(daemon.address, args)


if __name__ == "__main__":
    sys.exit(main())

"""Train the digits feature net used by the metrics: `python -m tinyfusion.train_classifier`.

Trains on a fixed 80% split of the digits (random 1-pixel shifts as augmentation), reports accuracy on
the held-out 20%, and writes the weights (safetensors, atomically) plus a JSON record beside them.
"""
import json
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import atomic_write
from .data import load_digits_tensors, train_test_split
from .errors import Parser, cli, positive, writable_file
from .eval.classifier import DigitsClassifier


def random_shift(x, g, pad=1):
    """Shift each image by up to `pad` pixels, filling with the background value (-1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * pad + 1, (2, n), generator=g)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(net, x, y):
    net.eval()
    return (net(x).argmax(1) == y).float().mean().item()


@cli
def main(argv=None):
    p = Parser(prog="python -m tinyfusion.train_classifier", description=__doc__)
    from .assets import CLASSIFIER_PATH

    p.add_argument("--out", default=CLASSIFIER_PATH, help="weights file (default: the shipped asset)")
    p.add_argument("--epochs", type=positive(), default=40)
    p.add_argument("--batch-size", type=positive(), default=64)
    p.add_argument("--lr", type=positive(float), default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    writable_file(args.out)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x, y = load_digits_tensors()
    train_idx, test_idx = train_test_split(len(x))
    net = DigitsClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    t0 = time.time()
    for _ in tqdm(range(args.epochs), desc="classifier"):
        net.train()
        for idx in train_idx[torch.randperm(len(train_idx), generator=g)].split(args.batch_size):
            loss = F.cross_entropy(net(random_shift(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    test_acc = accuracy(net, x[test_idx], y[test_idx])
    train_acc = accuracy(net, x[train_idx], y[train_idx])
    from safetensors.torch import save_file

    atomic_write(args.out, lambda tmp: save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp))
    record = {"test_accuracy": round(test_acc, 4), "train_accuracy": round(train_acc, 4), "test_size": len(test_idx),
              "epochs": args.epochs, "seed": args.seed, "wall_seconds": round(time.time() - t0, 1)}
    atomic_write(os.path.splitext(args.out)[0] + ".json", lambda tmp: open(tmp, "w").write(json.dumps(record, indent=2)))
    print(f"held-out accuracy {test_acc:.4f} on {len(test_idx)} digits; wrote {args.out}")


if __name__ == "__main__":
    main()

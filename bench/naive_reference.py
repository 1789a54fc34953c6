"""A naive, reference-style training loop: the baseline the benchmark compares against.

What a straightforward tutorial/reference train.py does, with no caching:
  * torchvision ImageFolder + DataLoader (num_workers 0, the reference default);
  * train: RandomResizedCrop(224) + RandomHorizontalFlip; val: Resize(256) + CenterCrop(224);
  * every JPEG decoded and the full network run for every image in every epoch;
  * model.train() each epoch (BatchNorm of the frozen backbone updates its stats);
  * AdamW on the parameters that require grad;
  * latest.pt written every epoch, best_acc.pt / best_loss.pt re-written with torch.save when improved.

Prints the project's EPOCH line format plus `EPOCH_SECONDS <s>` so the bench can parse it.
Not part of the project; used only by bench/run_bench.py."""
from __future__ import annotations

import argparse
import os
import time

T_START = time.perf_counter()

import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build(arch: str, weights: str, num_classes: int) -> nn.Module:
    model = getattr(torchvision.models, arch)(weights=None)
    if weights != "none":
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected, unexpected
        assert all(k.startswith(("fc.", "classifier.")) for k in missing), missing
    if arch == "resnet18":
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:  # mobilenet_v2: keep torchvision's Dropout(0.2), replace the Linear
        model.classifier[1] = nn.Linear(model.classifier[1].in_features, num_classes)
    return model


def freeze(model: nn.Module, arch: str, policy: str) -> None:
    head = "fc." if arch == "resnet18" else "classifier."
    if policy == "full":
        train_prefixes = ("",)
    elif policy == "last":
        last = ("layer4.",) if arch == "resnet18" else tuple(f"features.{i}." for i in range(14, 19))
        train_prefixes = last + (head,)
    else:
        train_prefixes = (head,)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(train_prefixes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--policy", default="head", choices=["head", "last", "full"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--output-dir", required=True)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    val_tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                 transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    train_ds = datasets.ImageFolder(os.path.join(args.data_dir, "train"), train_tf)
    val_ds = datasets.ImageFolder(os.path.join(args.data_dir, "val"), val_tf)
    train_dl = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=True,
                                           num_workers=args.num_workers)
    val_dl = torch.utils.data.DataLoader(val_ds, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.num_workers)

    model = build(args.arch, args.weights, len(train_ds.classes))
    freeze(model, args.arch, args.policy)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    os.makedirs(args.output_dir, exist_ok=True)
    best_acc, best_loss = -1.0, float("inf")
    print(f"SETUP_SECONDS {time.perf_counter() - T_START:.3f}", flush=True)

    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        tl, tc, tn = 0.0, 0, 0
        for x, y in train_dl:
            logits = model(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            tl += loss.item() * len(y)
            tc += (logits.argmax(1) == y).sum().item()
            tn += len(y)
        model.eval()
        vl, vc, vn = 0.0, 0, 0
        with torch.no_grad():
            for x, y in val_dl:
                logits = model(x)
                vl += loss_fn(logits, y).item() * len(y)
                vc += (logits.argmax(1) == y).sum().item()
                vn += len(y)
        val_loss, val_acc = vl / vn, vc / vn
        ckpt = {"epoch": epoch, "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
                "best_val_acc": max(best_acc, val_acc), "class_names": train_ds.classes, "args": vars(args)}
        torch.save(ckpt, os.path.join(args.output_dir, "latest.pt"))
        if val_acc > best_acc:
            best_acc = val_acc
            torch.save(ckpt, os.path.join(args.output_dir, "best_acc.pt"))
        if val_loss < best_loss:
            best_loss = val_loss
            torch.save(ckpt, os.path.join(args.output_dir, "best_loss.pt"))
        print(f"EPOCH {epoch}/{args.epochs}  train_loss={tl / tn:.4f} train_acc={tc / tn:.4f}  "
              f"val_loss={val_loss:.4f} val_acc={val_acc:.4f}  lr={args.lr:g}", flush=True)
        print(f"EPOCH_SECONDS {time.perf_counter() - t0:.3f}", flush=True)


if __name__ == "__main__":
    main()

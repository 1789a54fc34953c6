"""Does the model's confidence mean anything? Temperature scaling (Guo et al.
2017, "On Calibration of Modern Neural Networks"): one scalar T divides the
logits, fitted to minimise the validation negative log-likelihood; argmax (and
so accuracy) is unchanged, only the probabilities move. Plus the measures that
show it: expected calibration error (ECE, 15 equal-width bins as in the paper),
the reliability diagram's bins, and the risk-coverage curve of an abstain rule
("unsure" below a confidence threshold)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

ECE_BINS = 15
T_MIN, T_MAX = 0.05, 100.0  # inside checkpoint_rules' bounds (1e-3 .. MAX_TEMPERATURE)


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class under softmax(logits / T)."""
    return float(nn.functional.cross_entropy(logits.double() / temperature, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising val NLL: LBFGS on log T (so T stays positive and the
    problem is smooth; NLL is convex in 1/T). 1.0 when there is nothing to fit:
    no images, or no mistakes (every val image right: the NLL then falls as T
    goes to 0, which would make the model certain of everything it sees next)."""
    logits, labels = logits.detach().double().cpu(), labels.detach().cpu()
    if not len(labels) or not torch.isfinite(logits).all() or no_mistakes(logits, labels):
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        return 1.0
    t = min(max(t, T_MIN), T_MAX)
    # LBFGS can stop on a flat stretch; never keep a T that is worse than none.
    return t if nll(logits, labels, t) <= nll(logits, labels, 1.0) else 1.0


def no_mistakes(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    return bool((logits.argmax(1) == labels).all())


def bins(confidence, correct, n_bins: int = ECE_BINS) -> list[dict]:
    """Reliability-diagram bins over (0, 1]: lo, hi, count, mean confidence and
    accuracy of the answers whose top-1 probability falls in it (None when empty)."""
    conf = torch.as_tensor(confidence, dtype=torch.float64)
    ok = torch.as_tensor(correct, dtype=torch.float64)
    idx = torch.clamp(torch.ceil(conf * n_bins).long() - 1, 0, n_bins - 1)  # (lo, hi], p=0 into the first
    out = []
    for b in range(n_bins):
        m = idx == b
        n = int(m.sum())
        out.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": n,
                    "confidence": float(conf[m].mean()) if n else None,
                    "accuracy": float(ok[m].mean()) if n else None})
    return out


def ece(confidence, correct, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of (bin share) * |accuracy - confidence|."""
    rows = bins(confidence, correct, n_bins)
    total = sum(r["count"] for r in rows)
    if not total:
        return 0.0
    return sum(r["count"] / total * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"])


def risk_coverage(confidence, correct) -> list[dict]:
    """The abstain rule's trade-off: for each threshold P (each distinct
    confidence, highest first), the share of answers kept (p >= P) and their
    accuracy. Coverage rises from the single most confident answer to 1."""
    conf = torch.as_tensor(confidence, dtype=torch.float64)
    ok = torch.as_tensor(correct, dtype=torch.float64)
    if not len(conf):
        return []
    order = torch.argsort(conf, descending=True, stable=True)
    c, k = conf[order], ok[order].cumsum(0)
    n = len(c)
    last = torch.ones(n, dtype=torch.bool)  # keep the last of each run of equal confidences (ties kept together)
    last[:-1] = c[1:] != c[:-1]
    return [{"threshold": float(c[i]), "coverage": (i + 1) / n, "accuracy": float(k[i]) / (i + 1)}
            for i in torch.nonzero(last).flatten().tolist()]


def at_threshold(confidence, correct, p: float) -> dict:
    """Kept (p >= P): how many, their accuracy (None when none is kept), coverage."""
    conf = torch.as_tensor(confidence, dtype=torch.float64)
    ok = torch.as_tensor(correct, dtype=torch.bool)
    keep = conf >= p
    n, kept = len(conf), int(keep.sum())
    return {"kept": kept, "total": n, "coverage": kept / n if n else 0.0,
            "accuracy": float(ok[keep].double().mean()) if kept else None}


@dataclass
class Calibration:
    """Temperature fitted on one set of logits, and what it did there."""
    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float

    fitted: bool = True  # False: every val image was right, nothing to calibrate against (T = 1)

    def line(self, where: str) -> str:
        how = f"fitted on {where}" if self.fitted else \
            f"not fitted ({where} hold no mistake to calibrate against; T stays 1)"
        return (f"CALIBRATION: temperature={self.temperature:.4f} {how}: "
                f"val NLL {self.nll_before:.4f} -> {self.nll_after:.4f}, "
                f"ECE {self.ece_before:.4f} -> {self.ece_after:.4f}")


def calibrate(logits: torch.Tensor, labels: torch.Tensor) -> Calibration:
    """Fit T on (logits, labels) and measure NLL and ECE before and after."""
    logits, labels = logits.detach().double().cpu(), labels.detach().cpu()
    if not len(labels) or not torch.isfinite(logits).all():  # a diverged epoch: nothing to calibrate
        return Calibration(1.0, math.nan, math.nan, math.nan, math.nan)
    t = fit_temperature(logits, labels)

    def ece_at(temp):
        p, pred = torch.softmax(logits / temp, 1).max(1)
        return ece(p, pred == labels)

    return Calibration(t, nll(logits, labels), nll(logits, labels, t), ece_at(1.0), ece_at(t),
                       fitted=not no_mistakes(logits, labels))

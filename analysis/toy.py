"""The toy model of robust and non-robust features (Tsipras et al. 2019), trained with ERM, SAM and AT.

Data, for a label ``y`` uniform in ``{-1, +1}``::

    x_0          = +y with probability p, -y otherwise        (the robust feature: an L-inf adversary with
                                                               eps < 1 cannot flip its sign)
    x_1 .. x_d   ~ N(eta * y, 1) independently                (non-robust features: each is weak, all of them
                                                               together are highly predictive, and an
                                                               adversary with eps >= 2 eta flips them all)

Models: ``linear`` (``f(x) = w.x + b``) and ``mlp`` (``f(x) = v.relu(W x + c) + b``); the label is
``sign f(x)``, the loss is the logistic loss ``softplus(-y f(x))``.

Methods: ``erm``; ``sam`` at radius ``rho`` (two-phase SAM step on the clean loss, Foret et al. 2021, written
out here in a few lines so that the toy does not depend on the engine's optimizer wrapper); ``at``:
adversarial training with an L-inf ball of radius ``eps`` on *all* inputs (Madry et al. 2018), exact for the
linear model (the worst case of a linear ``f`` is ``y f(x) - eps ||w||_1``) and PGD (``samat.common.attacks.pgd``)
for the MLP. SGD with momentum and a cosine learning-rate decay; SAM's rho and AT's eps ramp up linearly
over the first 30 % of the steps (without it the MLP collapses to a constant at large eps or rho).

Also measured: the weight-space sharpness of each trained model on its training set
(``samat.common.sharpness.estimate_sharpness`` at one probe radius), to set the input-space picture next to the
weight-space one.

Robust share (the number the experiment is about): the share of the model's input sensitivity that sits on
the robust feature, ``E|df/dx_0| / sum_j E|df/dx_j|`` over the test set, in ``[0, 1]``. For the linear model
it is exactly ``|w_0| / ||w||_1`` (bias excluded). For the MLP we also report the first-layer weight analogue
``||W[:, 0]||_1 / sum_j ||W[:, j]||_1``. The Bayes-optimal linear classifier puts
``log(p/(1-p)) / (log(p/(1-p)) + 2 d eta)`` of its weight on ``x_0`` (0.072 at the defaults): a model that
relies on the robust feature has a share near 1, one that relies on the non-robust ones a share near 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samat.common.attacks import pgd
from samat.common.sharpness import estimate_sharpness
from samat.common.stats import stat
from samat.common.task import AttackSurface

MODELS = ("linear", "mlp")
METHODS = ("erm", "sam", "at")


@dataclass
class ToyConfig:
    """Data, model and optimisation of one toy run (``rho``/``eps`` and the seed are per run)."""

    d: int = 50                 # number of non-robust features
    p: float = 0.9              # P(x_0 = y), in (0.5, 1]
    eta: float = 2 / math.sqrt(50)  # mean of the non-robust features (times y); Tsipras: Theta(1/sqrt(d))
    n_train: int = 2000
    n_test: int = 5000
    hidden: int = 32            # MLP width
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    pgd_steps: int = 10         # PGD steps for MLP adversarial training and evaluation
    warmup: float = 0.3         # share of steps over which SAM's rho and AT's eps ramp up linearly from 0
    probe_rho: float = 0.5      # radius of the weight-space sharpness probe (samat.common.sharpness), ~10% of ||w||


def make_data(n: int, d: int, p: float, eta: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` examples: ``x`` of shape ``(n, d + 1)`` (column 0 the robust feature), ``y`` of shape ``(n,)``
    in ``{-1., +1.}``."""
    y = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
    agree = torch.rand(n, generator=generator) < p
    x0 = torch.where(agree, y, -y)
    rest = eta * y[:, None] + torch.randn(n, d, generator=generator)
    return torch.cat([x0[:, None], rest], dim=1), y


def build_model(kind: str, d: int, hidden: int) -> nn.Module:
    """``linear`` or ``mlp`` on ``d + 1`` inputs with one output (the logit of ``y = +1``)."""
    if kind == "linear":
        return nn.Linear(d + 1, 1)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d + 1, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    raise ValueError(f"unknown toy model {kind!r}; choose one of: {', '.join(MODELS)}")


def logits(model: nn.Module, x: Tensor) -> Tensor:
    """``f(x)``, shape ``(n,)``."""
    return model(x).squeeze(-1)


def adversarial_logits(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int) -> Tensor:
    """``f(x + delta)`` at the worst L-inf ``delta`` of radius ``eps`` for label ``y``, shape ``(n,)``.

    Linear: exact, ``f(x) - y eps ||w||_1`` (differentiable in ``w``, so AT trains on the true worst case).
    MLP: PGD with ``steps`` steps of ``2.5 eps / steps`` from a random start (no box: features are real).
    """
    if eps == 0:
        return logits(model, x)
    if isinstance(model, nn.Linear):
        return logits(model, x) - y * eps * model.weight.abs().sum()
    surface = AttackSurface(x=x.detach(), forward=lambda delta: logits(model, x + delta), bounds=None)
    delta = pgd(surface, lambda f, _step: F.softplus(-y * f).sum(), eps=eps, alpha=2.5 * eps / steps,
                steps=steps, norm="linf")
    return logits(model, x + delta)


def _sam_step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn, rho: float) -> float:
    """One SAM update: climb to ``w + rho g/||g||``, take the gradient there, come back, step."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads)).clamp_min(1e-12)
    with torch.no_grad():
        perturbation = [rho * g / norm for g in grads]
        for p, e in zip(params, perturbation):
            p.add_(e)
    opt.zero_grad()
    loss_fn().backward()  # the descent gradient is the one at the perturbed weights
    with torch.no_grad():
        for p, e in zip(params, perturbation):
            p.sub_(e)
    opt.step()
    return float(loss.detach())


def train(model: nn.Module, x: Tensor, y: Tensor, method: str, value: float, cfg: ToyConfig,
          generator: torch.Generator) -> None:
    """Mini-batch SGD (momentum, cosine LR decay to 0) for ``cfg.epochs`` epochs. ``value`` is ``rho`` for
    ``sam``, ``eps`` for ``at``, ignored for ``erm``; it ramps up linearly over the first ``cfg.warmup``
    share of the steps."""
    if method not in METHODS:
        raise ValueError(f"unknown toy method {method!r}; choose one of: {', '.join(METHODS)}")
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n = x.shape[0]
    total = cfg.epochs * math.ceil(n / cfg.batch_size)
    # Cosine decay to 0: without it SGD keeps the AT models' non-robust weights jittering around 0
    # (the worst-case loss has an L1 kink there), which blurs the robust share.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
    step = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            xb, yb = x[idx], y[idx]
            # Radius warm-up: at full eps from a random init, every MLP hidden unit faces a worst case
            # eps * ||W_j||_1 larger than its signal, and AT drives all ReLUs dead (a constant classifier);
            # the same happens to SAM at rho >= 1. Both radii ramp up alike so the comparison stays fair.
            radius = value * min(1.0, (step + 1) / (cfg.warmup * total)) if cfg.warmup > 0 else value
            step += 1
            if method == "sam" and radius > 0:
                _sam_step(model, opt, lambda xb=xb, yb=yb: F.softplus(-yb * logits(model, xb)).mean(), radius)
                sched.step()
                continue
            eps = radius if method == "at" else 0.0
            loss = F.softplus(-yb * adversarial_logits(model, xb, yb, eps, cfg.pgd_steps)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


def robust_share(model: nn.Module, x: Tensor) -> float:
    """``E|df/dx_0| / sum_j E|df/dx_j|`` over ``x`` (``(n, d + 1)``), in ``[0, 1]``."""
    xg = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(logits(model, xg).sum(), xg)
    mass = grad.abs().mean(dim=0)
    return float(mass[0] / mass.sum().clamp_min(1e-12))


def weight_share(model: nn.Module) -> float:
    """First-layer weight mass on the robust feature: ``||W[:, 0]||_1 / sum_j ||W[:, j]||_1``."""
    first = model if isinstance(model, nn.Linear) else model[0]
    mass = first.weight.detach().abs().sum(dim=0)
    return float(mass[0] / mass.sum().clamp_min(1e-12))


class ToyTask:
    """The toy as a :class:`samat.common.task.Task` as far as :func:`samat.common.sharpness.estimate_sharpness` needs:
    ``batch = {"x": (n, d + 1), "y": (n,) in {-1, +1}}``, logistic loss."""

    def forward(self, model: nn.Module, batch: dict) -> Tensor:
        return logits(model, batch["x"])

    def loss(self, f: Tensor, batch: dict) -> Tensor:
        return F.softplus(-batch["y"] * f).mean()


def evaluate(model: nn.Module, x: Tensor, y: Tensor, cfg: ToyConfig,
             eval_eps: Sequence[float]) -> dict[str, Any]:
    """Clean accuracy, robust accuracy at each L-inf radius in ``eval_eps`` (exact for the linear model,
    PGD for the MLP), the robust share and the first-layer weight share on ``(x, y)``. Accuracies in
    ``[0, 1]``."""
    model.eval()
    with torch.no_grad():
        clean = (torch.sign(logits(model, x)) == y).float().mean().item()
    robust = {}
    for eps in eval_eps:
        adv = adversarial_logits(model, x, y, eps, cfg.pgd_steps).detach()
        robust[eps_key(eps)] = (torch.sign(adv) == y).float().mean().item()
    return {"clean_accuracy": clean, "robust_accuracy": robust, "robust_share": robust_share(model, x),
            "weight_share": weight_share(model),
            # Below 0.6 the model has not even learnt x_0 alone (accuracy p): training collapsed, typically
            # to a constant prediction with dead ReLUs; such runs are flagged, not hidden.
            "collapsed": clean < 0.6}


def eps_key(eps: float) -> str:
    """How a radius is written as a key in results: 3 significant digits."""
    return f"{eps:.3g}"


def run_one(cfg: ToyConfig, model_kind: str, method: str, value: float, seed: int,
            eval_eps: Sequence[float]) -> dict[str, Any]:
    """Train and evaluate one (model, method, rho-or-eps, seed). The data depend on the seed only, so all
    methods of one seed see the same train and test sets."""
    data_gen = torch.Generator().manual_seed(seed)
    x_train, y_train = make_data(cfg.n_train, cfg.d, cfg.p, cfg.eta, data_gen)
    x_test, y_test = make_data(cfg.n_test, cfg.d, cfg.p, cfg.eta, data_gen)
    torch.manual_seed(seed)  # model init and PGD random starts
    model = build_model(model_kind, cfg.d, cfg.hidden)
    train(model, x_train, y_train, method, value, cfg, torch.Generator().manual_seed(seed + 1))
    metrics = evaluate(model, x_test, y_test, cfg, eval_eps)
    # Weight-space sharpness on the training set (what SAM minimises), at one probe radius for all runs.
    sharp = estimate_sharpness(model, ToyTask(), [{"x": x_train, "y": y_train}], cfg.probe_rho, steps=5)
    return {"model": model_kind, "method": method, "rho": value if method == "sam" else 0.0,
            "eps": value if method == "at" else 0.0, "seed": seed, **metrics,
            "sharpness": sharp["sharpness"], "train_loss": sharp["loss"]}


def grid(models: Sequence[str], rhos: Sequence[float], epss: Sequence[float]) -> list[tuple[str, str, float]]:
    """``(model, method, value)`` for ERM, SAM at each rho and AT at each eps, per model."""
    settings = [("erm", 0.0)] + [("sam", r) for r in rhos] + [("at", e) for e in epss]
    return [(m, method, value) for m in models for method, value in settings]


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of every number, per ``(model, method, rho, eps)``, in
    first-seen order (:func:`samat.common.stats.stat`: ``ddof=1``, ``None`` for one seed). Collapsed runs
    are counted, and included."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["method"], row["rho"], row["eps"]), []).append(row)
    out = []
    for (model, method, rho, eps), members in groups.items():
        entry: dict[str, Any] = {"model": model, "method": method, "rho": rho, "eps": eps,
                                 "seeds": len(members), "collapsed": sum(r["collapsed"] for r in members)}
        columns = {name: [r[name] for r in members]
                   for name in ("clean_accuracy", "robust_share", "weight_share", "sharpness")}
        for key in members[0]["robust_accuracy"]:
            columns[f"robust_accuracy@{key}"] = [r["robust_accuracy"][key] for r in members]
        for name, values in columns.items():
            st = stat(values)
            entry[name] = st.mean
            entry[f"{name}_std"] = st.std
        out.append(entry)
    return out


def bayes_robust_share(cfg: ToyConfig) -> float:
    """Robust share of the Bayes-optimal linear classifier (log-likelihood-ratio weights)."""
    w0 = math.log(cfg.p / (1 - cfg.p)) if cfg.p < 1 else math.inf
    return 1.0 if math.isinf(w0) else w0 / (w0 + 2 * cfg.d * cfg.eta)

"""The toy model of robust and non-robust features (Tsipras et al. 2019), trained with ERM, SAM and AT.

Data, for a label ``y`` uniform in ``{-1, +1}``::

    x_0          = +y with probability p, -y otherwise        (the robust feature: an L-inf adversary with
                                                               eps < 1 cannot flip its sign)
    x_1 .. x_d   ~ N(eta * y, 1) independently                (non-robust features: each is weak, all of them
                                                               together are highly predictive, and an
                                                               adversary with eps >= 2 eta flips them all)

Models (:data:`MODELS`): ``linear`` (``f(x) = w.x + b``), ``diag`` (a diagonal linear network,
``f(x) = (u * v).x + b``: linear in ``x`` with weights ``beta = u * v``, the two-layer model on which
Andriushchenko & Flammarion 2022 show that 1-SAM prefers sparse ``beta``) and ``mlp``
(``f(x) = v.relu(W x + c) + b``, width ``hidden``); the label is ``sign f(x)``. Losses (:data:`LOSSES`) are
functions of the margin ``m = y f(x)``: ``logistic`` ``softplus(-m)``, ``hinge`` ``max(0, 1 - m)``,
``squared`` ``(1 - m)^2`` (= ``(y - f)^2`` for ``y`` in ``{-1, +1}``).

Methods: ``erm``; ``sam`` at radius ``rho`` (two-phase SAM step on the clean loss, Foret et al. 2021, written
out here in a few lines so that the toy does not depend on the engine's optimizer wrapper), with
m-sharpness: each mini-batch is cut into groups of ``sam_m`` examples, every group climbs to its *own*
``w + rho g_k/||g_k||`` and takes its gradient there, and the descent gradient is the size-weighted mean of
those (Foret et al. 2021 sec. 4, Andriushchenko & Flammarion 2022); ``sam_m = 0`` (or >= the batch) is
ordinary mini-batch SAM, ``batch_size = n_train`` full-batch SAM; ``at``:
adversarial training with an L-inf ball of radius ``eps`` on *all* inputs (Madry et al. 2018), exact for the
linear and diagonal models (the worst case of a linear ``f`` moves the margin by ``eps ||beta||_1`` in the
direction that raises the loss) and PGD (``samat.common.attacks.pgd``) for the MLP. SGD with momentum and a cosine learning-rate decay; SAM's rho and AT's eps ramp up linearly
over the first 30 % of the steps (without it the MLP collapses to a constant at large eps or rho).

Also measured: the weight-space sharpness of each trained model on its training set
(``samat.common.sharpness.estimate_sharpness`` at one probe radius), to set the input-space picture next to the
weight-space one.

Robust share (the number the experiment is about): the share of the model's input sensitivity that sits on
the robust feature, ``E|df/dx_0| / sum_j E|df/dx_j|`` over the test set, in ``[0, 1]``. For the linear model
it is exactly ``|w_0| / ||w||_1`` (bias excluded), for ``diag`` ``|beta_0| / ||beta||_1``. For the MLP we also
report the first-layer weight analogue ``||W[:, 0]||_1 / sum_j ||W[:, j]||_1``. The Bayes-optimal linear classifier puts
``log(p/(1-p)) / (log(p/(1-p)) + 2 d eta)`` of its weight on ``x_0`` (0.072 at the defaults): a model that
relies on the robust feature has a share near 1, one that relies on the non-robust ones a share near 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from samat.common.attacks import pgd
from samat.common.sharpness import estimate_sharpness
from samat.common.stats import stat
from samat.common.task import AttackSurface

MODELS = ("linear", "diag", "mlp")
METHODS = ("erm", "sam", "at")


class Loss(NamedTuple):
    """A margin loss: ``value(m)`` and its derivative ``dvalue(m)`` elementwise (``m = y f(x)``), and
    ``worst(m, r)``, the loss at the worst margin a linear model's adversary of strength ``r = eps ||beta||_1``
    can reach (it moves the margin anywhere in ``[m - r, m + r]``)."""

    value: Callable[[Tensor], Tensor]
    dvalue: Callable[[Tensor], Tensor]
    worst: Callable[[Tensor, Tensor], Tensor]


LOSSES: dict[str, Loss] = {
    # Decreasing in m: the worst case is the smallest margin.
    "logistic": Loss(lambda m: F.softplus(-m), lambda m: -torch.sigmoid(-m), lambda m, r: F.softplus(r - m)),
    "hinge": Loss(lambda m: F.relu(1 - m), lambda m: -(m < 1).to(m.dtype), lambda m, r: F.relu(1 - m + r)),
    # Not monotone (it also punishes margins above 1): the adversary pushes m away from 1.
    "squared": Loss(lambda m: (1 - m) ** 2, lambda m: -2 * (1 - m), lambda m, r: ((1 - m).abs() + r) ** 2),
}


def lookup_loss(name: str) -> Loss:
    """The :data:`LOSSES` entry, or a ``ValueError`` that lists the valid names."""
    if name not in LOSSES:
        raise ValueError(f"unknown toy loss {name!r}; choose one of: {', '.join(LOSSES)}")
    return LOSSES[name]


@dataclass
class ToyConfig:
    """Data, model and optimisation of one toy run (``rho``/``eps`` and the seed are per run)."""

    d: int = 50                 # number of non-robust features
    p: float = 0.9              # P(x_0 = y), in (0.5, 1]
    eta: float = 2 / math.sqrt(50)  # mean of the non-robust features (times y); Tsipras: Theta(1/sqrt(d))
    n_train: int = 2000
    n_test: int = 5000
    hidden: int = 32            # MLP width
    loss: str = "logistic"      # a LOSSES name
    sam_m: int = 0              # SAM's m: examples per perturbation group; 0 = the whole mini-batch
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


class DiagLinear(nn.Module):
    """``f(x) = (u * v).x + b`` on ``x`` of shape ``(n, k)``, output ``(n, 1)``. ``u`` and ``v`` start
    independent N(0, 0.1^2) (small init: the regime where the implicit bias of the factorisation shows)."""

    def __init__(self, k: int):
        super().__init__()
        self.u = nn.Parameter(0.1 * torch.randn(k))
        self.v = nn.Parameter(0.1 * torch.randn(k))
        self.bias = nn.Parameter(torch.zeros(1))

    def beta(self) -> Tensor:
        """The effective linear weights ``u * v``, shape ``(k,)``."""
        return self.u * self.v

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.beta() + self.bias)[:, None]


def linear_weights(model: nn.Module) -> Optional[Tensor]:
    """The weights ``beta`` (shape ``(d + 1,)``) of a model linear in ``x``; ``None`` for the MLP."""
    if isinstance(model, nn.Linear):
        return model.weight.flatten()
    if isinstance(model, DiagLinear):
        return model.beta()
    return None


def build_model(kind: str, d: int, hidden: int) -> nn.Module:
    """``linear``, ``diag`` or ``mlp`` on ``d + 1`` inputs with one output (the logit of ``y = +1``)."""
    if kind == "linear":
        return nn.Linear(d + 1, 1)
    if kind == "diag":
        return DiagLinear(d + 1)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d + 1, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    raise ValueError(f"unknown toy model {kind!r}; choose one of: {', '.join(MODELS)}")


def logits(model: nn.Module, x: Tensor) -> Tensor:
    """``f(x)``, shape ``(n,)``."""
    return model(x).squeeze(-1)


def _pgd_delta(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, loss: Loss) -> Tensor:
    """PGD's L-inf ``delta`` (shape of ``x``) that raises ``loss``: ``steps`` steps of ``2.5 eps / steps``
    from a random start (no box: features are real)."""
    surface = AttackSurface(x=x.detach(), forward=lambda delta: logits(model, x + delta), bounds=None)
    return pgd(surface, lambda f, _step: loss.value(y * f).sum(), eps=eps, alpha=2.5 * eps / steps,
               steps=steps, norm="linf")


def adversarial_logits(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int) -> Tensor:
    """``f(x + delta)`` at the L-inf ``delta`` of radius ``eps`` that minimises the margin ``y f``, shape
    ``(n,)`` (what robust accuracy needs, whatever the training loss).

    Linear and diag: exact, ``f(x) - y eps ||beta||_1`` (differentiable in the weights). MLP: PGD on the
    logistic loss.
    """
    if eps == 0:
        return logits(model, x)
    beta = linear_weights(model)
    if beta is not None:
        return logits(model, x) - y * eps * beta.abs().sum()
    return logits(model, x + _pgd_delta(model, x, y, eps, steps, LOSSES["logistic"]))


def adversarial_loss(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, loss: Loss) -> Tensor:
    """Mean over the batch of the worst ``loss`` in the L-inf ball of radius ``eps`` (scalar): exact for the
    linear and diag models (:attr:`Loss.worst`), PGD on ``loss`` for the MLP."""
    if eps == 0:
        return loss.value(y * logits(model, x)).mean()
    beta = linear_weights(model)
    if beta is not None:
        return loss.worst(y * logits(model, x), eps * beta.abs().sum()).mean()
    return loss.value(y * logits(model, x + _pgd_delta(model, x, y, eps, steps, loss))).mean()


def sam_gradient(model: nn.Module, loss_fn: Callable[[], Tensor], rho: float) -> list[Tensor]:
    """Ordinary SAM's descent direction, one per parameter: climb to ``w + rho g/||g||``, take the gradient
    there, come back (the weights are restored exactly)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(), params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads)).clamp_min(1e-12)
    saved = [p.detach().clone() for p in params]  # restore by copy: w + e - e is not w in floating point
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(rho * g / norm)
    descent = torch.autograd.grad(loss_fn(), params)  # the gradient at the perturbed weights
    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)
    return list(descent)


def msam_gradient(model: nn.Module, x: Tensor, y: Tensor, loss: Loss, rho: float, m: int) -> list[Tensor]:
    """m-SAM's descent direction, one per parameter, for the batch ``x`` ``(B, d + 1)``, ``y`` ``(B,)``.

    The batch is cut, in order, into groups of ``m`` examples (the last one may be smaller). Group ``k``
    climbs to its own ``w + rho g_k/||g_k||`` (``g_k`` its mean-loss gradient), takes its gradient there,
    and the groups' gradients are averaged weighted by size, so that ``rho = 0`` gives the batch's ERM
    gradient and ``m >= B`` gives :func:`sam_gradient`. Groups run in parallel through ``torch.func.vmap``.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def group_loss(ps: dict, xg: Tensor, yg: Tensor) -> Tensor:
        return loss.value(yg * functional_call(model, ps, (xg,)).squeeze(-1)).mean()

    def ascent_then_descent(xg: Tensor, yg: Tensor) -> dict:
        g = grad(group_loss)(params, xg, yg)
        norm = torch.sqrt(sum((g[n] ** 2).sum() for n in names)).clamp_min(1e-12)
        # Each group's own perturbation: the line that makes this m-SAM and not SAM.
        return grad(group_loss)({n: params[n] + rho * g[n] / norm for n in names}, xg, yg)

    batch = x.shape[0]
    m = batch if m <= 0 else min(m, batch)
    full = batch // m * m
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    if full:
        per_group = vmap(ascent_then_descent)(x[:full].reshape(-1, m, x.shape[1]), y[:full].reshape(-1, m))
        for n in names:
            total[n] += per_group[n].sum(0) * (m / batch)
    if full < batch:
        rest = ascent_then_descent(x[full:], y[full:])
        for n in names:
            total[n] += rest[n] * ((batch - full) / batch)
    return [total[n] for n in names]


def train(model: nn.Module, x: Tensor, y: Tensor, method: str, value: float, cfg: ToyConfig,
          generator: torch.Generator) -> None:
    """Mini-batch SGD (momentum, cosine LR decay to 0) for ``cfg.epochs`` epochs. ``value`` is ``rho`` for
    ``sam``, ``eps`` for ``at``, ignored for ``erm``; it ramps up linearly over the first ``cfg.warmup``
    share of the steps."""
    if method not in METHODS:
        raise ValueError(f"unknown toy method {method!r}; choose one of: {', '.join(METHODS)}")
    loss = lookup_loss(cfg.loss)
    params = [p for p in model.parameters() if p.requires_grad]
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
                if 0 < cfg.sam_m < xb.shape[0]:
                    direction = msam_gradient(model, xb, yb, loss, radius, cfg.sam_m)
                else:
                    direction = sam_gradient(model, lambda: loss.value(yb * logits(model, xb)).mean(), radius)
                for p, g in zip(params, direction):
                    p.grad = g
            else:
                eps = radius if method == "at" else 0.0
                opt.zero_grad()
                adversarial_loss(model, xb, yb, eps, cfg.pgd_steps, loss).backward()
            opt.step()
            sched.step()


def robust_share(model: nn.Module, x: Tensor) -> float:
    """``E|df/dx_0| / sum_j E|df/dx_j|`` over ``x`` (``(n, d + 1)``), in ``[0, 1]``."""
    xg = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(logits(model, xg).sum(), xg)
    mass = grad.abs().mean(dim=0)
    return float(mass[0] / mass.sum().clamp_min(1e-12))


def weight_share(model: nn.Module) -> float:
    """Weight mass on the robust feature: ``|beta_0| / ||beta||_1`` for the linear and diag models, the first
    layer's ``||W[:, 0]||_1 / sum_j ||W[:, j]||_1`` for the MLP."""
    beta = linear_weights(model)
    mass = (beta if beta is not None else model[0].weight.abs().sum(dim=0)).detach().abs()
    return float(mass[0] / mass.sum().clamp_min(1e-12))


class ToyTask:
    """The toy as a :class:`samat.common.task.Task` as far as :func:`samat.common.sharpness.estimate_sharpness` needs:
    ``batch = {"x": (n, d + 1), "y": (n,) in {-1, +1}}``, the run's margin loss."""

    def __init__(self, loss: str = "logistic"):
        self.margin_loss = lookup_loss(loss)

    def forward(self, model: nn.Module, batch: dict) -> Tensor:
        return logits(model, batch["x"])

    def loss(self, f: Tensor, batch: dict) -> Tensor:
        return self.margin_loss.value(batch["y"] * f).mean()


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
    sharp = estimate_sharpness(model, ToyTask(cfg.loss), [{"x": x_train, "y": y_train}], cfg.probe_rho, steps=5)
    return {"model": model_kind, "method": method, "rho": value if method == "sam" else 0.0,
            "eps": value if method == "at" else 0.0, "seed": seed, **metrics,
            "sharpness": sharp["sharpness"], "train_loss": sharp["loss"]}


def grid(models: Sequence[str], rhos: Sequence[float], epss: Sequence[float]) -> list[tuple[str, str, float]]:
    """``(model, method, value)`` for ERM, SAM at each rho and AT at each eps, per model."""
    settings = [("erm", 0.0)] + [("sam", r) for r in rhos] + [("at", e) for e in epss]
    return [(m, method, value) for m in models for method, value in settings]


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, standard deviation and 95 % interval half-width over seeds of every number, per
    ``(variant, model, method, rho, eps)`` (``variant`` defaults to ``"base"``), in first-seen order
    (:func:`samat.common.stats.stat`: ``ddof=1``, ``None`` for one seed). Collapsed runs are counted, and
    included."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row.get("variant", "base"), row["model"], row["method"], row["rho"], row["eps"])
        groups.setdefault(key, []).append(row)
    erm = {(r.get("variant", "base"), r["model"], r["seed"]): r["robust_share"] for r in rows if r["method"] == "erm"}
    out = []
    for (variant, model, method, rho, eps), members in groups.items():
        entry: dict[str, Any] = {"variant": variant, "model": model, "method": method, "rho": rho, "eps": eps,
                                 "seeds": len(members), "collapsed": sum(r["collapsed"] for r in members)}
        columns = {name: [r[name] for r in members]
                   for name in ("clean_accuracy", "robust_share", "weight_share", "sharpness")}
        # Paired by seed (same data, init and order): the shift of the robust share away from this
        # variant's ERM, the number claim (d) is about.
        base = [erm.get((variant, model, r["seed"])) for r in members]
        columns["share_shift"] = [None if b is None else r["robust_share"] - b for r, b in zip(members, base)]
        for key in members[0]["robust_accuracy"]:
            columns[f"robust_accuracy@{key}"] = [r["robust_accuracy"][key] for r in members]
        for name, values in columns.items():
            st = stat(values)
            entry[name] = st.mean
            entry[f"{name}_std"] = st.std
            entry[f"{name}_ci95"] = st.ci95
        out.append(entry)
    return out


# Knobs a sweep may vary one at a time (``model`` is the architecture, the rest are ToyConfig fields).
KNOBS = ("sam_m", "batch_size", "model", "hidden", "loss", "weight_decay", "epochs")


def vary(cfg: ToyConfig, model: str, knob: str, value: Any) -> tuple[ToyConfig, str]:
    """``(cfg, model)`` with ``knob`` set to ``value``. ``batch_size`` keeps the number of optimizer steps
    (``epochs`` scaled up), so that full-batch SAM is not also a shorter training run."""
    if knob not in KNOBS:
        raise ValueError(f"unknown toy knob {knob!r}; choose one of: {', '.join(KNOBS)}")
    if knob == "model":
        return cfg, value
    if knob == "batch_size":
        steps = cfg.epochs * math.ceil(cfg.n_train / cfg.batch_size)
        return replace(cfg, batch_size=value, epochs=math.ceil(steps / math.ceil(cfg.n_train / value))), model
    return replace(cfg, **{knob: value}), model


def bayes_robust_share(cfg: ToyConfig) -> float:
    """Robust share of the Bayes-optimal linear classifier (log-likelihood-ratio weights)."""
    w0 = math.log(cfg.p / (1 - cfg.p)) if cfg.p < 1 else math.inf
    return 1.0 if math.isinf(w0) else w0 / (w0 + 2 * cfg.d * cfg.eta)

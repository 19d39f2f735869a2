"""Table 3 of the reproduction: accuracy under adversarial attack, as the paper claims robustness.

    python -m tools.paper.robustness [--shard k/n]

White-box L-infinity attacks computed through the PyTorch bridge (the ONNX graph run as a torch module, so
the attacked network is exactly the ONNX model) on the first Config.robust_images test images:
- FGSM: x' = clip(x + eps * sign(grad_x CE), 0, 1), one step;
- PGD: Config.pgd_steps steps of size eps/4 from x (no random start), projected back onto the eps-ball
  and [0, 1] after each step.
eps in pixel units of the [0, 1] image (the attack perturbs pixels, then the model's normalisation is
applied), for each eps in Config.fgsm_eps. Models: the original, and the seed-0 fine-tuned models (both
modes, every level) of the Consensus and of the best single metric.
"""
from __future__ import annotations

import numpy as np

from .common import CONFIG, Config, load_result, load_saved_model, original_model, save_result, test_arrays, \
    units_for_shard, worker_args
from .finetune_runs import MODES, best_single, unit_name
from .rows import AttackRow, RobustnessRow


def attack_accuracy(model, x: np.ndarray, y: np.ndarray, eps: float, steps: int, batch_size: int = 100) -> float:
    """Accuracy on (x, y) after an L-inf attack of radius ``eps`` (pixels); ``steps`` 0 means clean, 1 FGSM,
    more PGD with step eps/4. x is the model's normalised input."""
    import torch
    import torch.nn.functional as F

    from onnx_consensus.bridge import to_torch
    from tools.data.fmnist import MEAN, STD

    module = to_torch(model).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    hits = 0
    for i in range(0, len(x), batch_size):
        pix = torch.from_numpy(x[i:i + batch_size] * STD + MEAN)
        target = torch.from_numpy(y[i:i + batch_size]).long()
        adv = pix.clone()
        step = eps if steps == 1 else eps / 4
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = F.cross_entropy(module((adv - MEAN) / STD), target)
            grad, = torch.autograd.grad(loss, adv)
            with torch.no_grad():
                adv = adv + step * grad.sign()
                adv = torch.min(torch.max(adv, pix - eps), pix + eps).clamp(0, 1)
        with torch.no_grad():
            hits += int((module(((adv - MEAN) / STD).float()).argmax(1) == target).sum())
    return hits / len(x)


def units(config: Config) -> list[tuple[str, int | None, str | None]]:
    best = best_single(config)
    if best is None:
        raise SystemExit("the seed-0 fine-tuning runs are not all done: run finetune_runs first")
    return [("original", None, None)] + [(c, lv, mode) for c in ("consensus", best) for lv in config.levels
                                         for mode in MODES]


def main(argv=None) -> None:
    args = worker_args(__doc__, argv)
    config = CONFIG
    x, y = test_arrays()
    x, y = x[:config.robust_images], y[:config.robust_images]
    for criterion, level, mode in units_for_shard(units(config), args.shard):
        name = "original" if level is None else unit_name(criterion, level, mode, 0, config.train_images)
        if load_result("robustness", name, config) is not None:
            continue
        model = original_model(config) if level is None else load_saved_model("finetune", name, config)
        row = RobustnessRow(criterion, level, mode, len(x), attack_accuracy(model, x, y, 0.0, 0))
        for eps in config.fgsm_eps:
            for attack, steps in (("fgsm", 1), ("pgd", config.pgd_steps)):
                row.attacks.append(AttackRow(attack, eps, steps, attack_accuracy(model, x, y, eps, steps)))
        save_result("robustness", name, row, config)
        print(name, f"clean {row.clean:.1%}",
              " ".join(f"{a.attack}@{a.eps * 255:.0f}/255 {a.accuracy:.1%}" for a in row.attacks), flush=True)


if __name__ == "__main__":
    main()

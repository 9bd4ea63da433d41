"""KL rules (doctrine, Debugging: "KL exploding" -> weak KL penalty, increase beta/kl_coef)."""

from __future__ import annotations

from posttrain.doctrine.doctor.context import Context
from posttrain.doctrine.doctor.events import Event
from posttrain.doctrine.doctor.stats import mean, series


def kl_above_target(c: Context) -> Event | None:
    """The recent mean per-token KL is above kl_target."""
    kl = series(c.history, "kl", c.th.recent)
    if len(kl) < c.th.recent or mean(kl) <= c.th.kl_target:
        return None
    return c.event("kl_above_target", "warning", f"KL to the reference is {mean(kl):.3g} per token, above the "
                   f"target {c.th.kl_target:g}", "the KL penalty is too weak for this learning rate",
                   "increase beta / kl_coef (doctrine: 'Increase beta/kl_coef') or lower the learning rate",
                   kl=mean(kl), target=c.th.kl_target)


def kl_exploding(c: Context) -> Event | None:
    """KL multiplied kl_explode_factor-fold in half a window, and faster than in the half before."""
    k, half = c.th.recent, max(2, c.th.window // 2)
    kl = series(c.history, "kl", 2 * half + k)
    if len(kl) < 2 * half + k:
        return None
    then, mid, now = mean(kl[:k]), mean(kl[half:half + k]), mean(kl[-k:])
    accelerating = now - mid >= 2 * max(mid - then, 0.0)  # growing faster and faster, not a steady ramp
    if now <= c.th.kl_floor or now < c.th.kl_explode_factor * max(mid, 1e-9) or not accelerating:
        return None
    return c.event("kl_exploding", "error", f"KL grew {now / max(mid, 1e-9):.1f}x in {half} steps and is "
                   f"accelerating ({then:.3g} -> {mid:.3g} -> {now:.3g})",
                   "weak KL penalty: the policy is running away from the reference",
                   "increase beta / kl_coef (doctrine: 'Increase beta/kl_coef'), lower the learning rate, and "
                   "read recent samples for reward hacking", then=then, mid=mid, now=now)

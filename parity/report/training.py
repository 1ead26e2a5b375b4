"""The training section of a run page (train cases): the loss of both sides and the gradients, in backward order.

Reads ``results["train"]`` (the backward mode's loss, per-token losses and gradient norms; the step mode's
trajectory, drawn: loss and gradient norm per step of HF, HF in fp32 in a bf16 run, and the system) and the module
rows of the backward modes (``loss``, ``grad_output``, ``grad_input``, ``param_grad``, and the isolated backward's).
"""
from __future__ import annotations

from html import escape

from parity.report import summary as S
from parity.report.svg import Point, Series, line_chart

GRADIENT_ROWS = {"loss": "loss", "grad_output": "output gradient", "grad_input": "input gradient",
                 "param_grad": "parameter gradient", "isolated_grad_input": "isolated input gradient",
                 "isolated_param_grad": "isolated parameter gradient"}


def _e(x) -> str:
    return escape(str(x), quote=True)


def section(results: dict) -> str:
    train = results.get("train")
    if not isinstance(train, dict):
        return ""
    loss = train.get("loss") or {}
    every = [r for r in S.modules(results) if r.get("mode") in GRADIENT_ROWS]
    rows = [r for r in every if r.get("gate_class") is not None]  # measured (reported rows carry no gate class)
    bad = sorted((r for r in rows if r.get("passed") is False), key=lambda r: r.get("order") or 0)
    n = {m: sum(r.get("mode") == m for r in rows) for m in GRADIENT_ROWS}
    counts = " · ".join(f"{n[m]} {label}s" for m, label in GRADIENT_ROWS.items()
                        if m != "loss" and (n[m] or not m.startswith("isolated")))
    if len(every) > len(rows):
        counts += f" · {len(every) - len(rows)} not observable in its model (reported with the reason)"
    worst = max(rows, key=lambda r: S.num(r.get("rel_l2")) or 0.0, default=None)
    full = lambda x: f"{x:.7g}" if isinstance(x, (int, float)) else "—"  # noqa: E731  (losses agree to ~1e-7)
    kv = [("loss, HF", full(loss.get("hf"))), ("loss, system", full(loss.get("system"))),
          ("relative difference", S.fmt(loss.get("rel_diff"))),
          ("per-token losses, rel L2", S.fmt((loss.get("per_token") or {}).get("rel_l2"))),
          ("labelled positions", loss.get("tokens")),
          ("grad norm, HF / system", f'{full((loss.get("grad_norm") or {}).get("hf"))} / '
                                     f'{full((loss.get("grad_norm") or {}).get("system"))}'),
          ("gate", S.fmt(loss.get("gate")) if loss.get("gate") is not None else loss.get("why_ungated", "—")),
          ("system's loss", train.get("system_loss") or "—"), ("labels", train.get("labels") or "—"),
          ("overrides", "; ".join(f"{k}: {v}" for k, v in (train.get("overrides") or {}).items()) or "none")]
    if train.get("grad_layers"):  # train.grad_layers: a memory option, said where the rows are read
        g = train["grad_layers"]
        below = ("and the word embedding, every other parameter frozen on both sides" if g.get("embedding") else
                 f'only, every other parameter frozen on both sides (no activation gradient below layer '
                 f'{min(g["layers"])})')
        kv.append(("gradients of", f'text decoder layers {", ".join(str(i) for i in g["layers"])} {below}: '
                                   f'{g.get("why") or ""}'))
    table = "".join(f'<tr><th style="text-align:left;font-weight:500">{_e(k)}</th><td>{_e(v)}</td></tr>'
                    for k, v in kv)
    first = (f'<p>First gradient to diverge, in backward order: <code>{_e(bad[0].get("name"))}</code> '
             f'({_e(GRADIENT_ROWS.get(bad[0].get("mode")))}, rel L2 {_e(S.fmt(bad[0].get("rel_l2")))}); '
             f'{len(bad)} gradient rows fail.</p>' if bad else
             f'<p class="muted">Every gradient row within its gate; the largest rel L2 is '
             f'{_e(S.fmt(worst.get("rel_l2")) if worst else "—")}'
             f'{" at <code>" + _e(worst.get("name")) + "</code>" if worst else ""}.</p>')
    return (f'<section id="training"><h2>Training step<span class="sub">{_e(counts)} · the module table lists every '
            f'row</span></h2>{first}<table style="table-layout:fixed;width:100%"><tbody>{table}</tbody></table>'
            f'{trajectory(train.get("trajectory"), results.get("dtype"))}</section>')


def trajectory(t: dict | None, dtype: str | None) -> str:
    """The trajectory's loss and gradient-norm curves (HF in the run's dtype; its band: HF in fp32 for a bf16 run, HF
    on weights one rounding apart for an fp32 run gated by its round-off band; the system) and its verdict."""
    if not isinstance(t, dict) or not t.get("steps"):
        return ""
    sides = [("HF" + (f" ({dtype})" if dtype and dtype != "float32" else ""), "#57606a", "", t.get("hf") or {}),
             ("HF (float32)", "#8c959f", "4 3", t.get("hf_fp32") or {}),
             ("HF, weights one rounding apart", "#8c959f", "4 3", t.get("hf_perturbed") or {}),
             ("system", "#0969da", "", t.get("system") or {})]
    charts = []
    for key, what in (("loss", "loss"), ("grad_norm", "gradient norm (before clipping)")):
        series = [Series(label, color, [Point(i + 1, v, f"{label}, step {i + 1}: {what} {v:.6g}")
                                        for i, v in enumerate(side.get(key) or [])], dash)
                  for label, color, dash, side in sides if side.get(key)]
        charts.append(line_chart(series, title=f"{what} per step", y_label=what, x_label="step"))
    cards = "".join(f'<div class="card">{c}</div>' for c in charts)
    if t.get("gate_rule"):
        verdict = (f'{t["gate_rule"]}: worst {S.fmt(t.get("worst_ratio"))} of its gate '
                   f'({"within" if t.get("passed") else "over"})')
    else:
        verdict = (f'largest relative difference of loss or gradient norm {S.fmt(t.get("worst_rel_diff"))}, gate '
                   f'{S.fmt(t.get("gate"))} ({"within" if t.get("passed") else "over"})')
    trains = t.get("trains")
    trained = "" if not trains else (
        f'<p class="muted">Trains text decoder layers {", ".join(str(i) for i in trains["layers"])} only, every other '
        f'parameter frozen on both sides: {_e(trains.get("why") or "")}</p>')
    return (f'<h3>Trajectory: {t["steps"]} optimizer steps on the case\'s batch</h3>{trained}<p class="muted">'
            f'{_e(verdict)}; loss after the last step: HF {S.fmt((t.get("hf") or {}).get("final_loss"))}, system '
            f'{S.fmt((t.get("system") or {}).get("final_loss"))}.</p><div class="grid g2">{cards}</div>')

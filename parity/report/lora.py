"""The LoRA section of a run page (LoRA cases): the adapters, the system's adapter export and merged export against
peft's, and one row per adapter tensor (its export, its gradient, the merged weight of its module).

Reads ``results["lora"]`` (the lora mode's section) and the module rows of the lora and backward modes.
"""
from __future__ import annotations

from html import escape

from parity.report import summary as S


def _e(x) -> str:
    return escape(str(x), quote=True)


def _cell(row: dict | None) -> str:
    if row is None:
        return '<td class="muted">—</td>'
    if row.get("missing"):
        return f'<td class="fail">{_e(row["missing"])}</td>'
    metric = (row.get("gate") or {}).get("metric", "rel_l2")
    return f'<td class="{"pass" if row.get("passed") else "fail"}">{_e(metric)} {_e(S.fmt(row.get(metric)))}</td>'


def _counts(c: dict | None) -> str:
    if not isinstance(c, dict):
        return "not made (see the failures)"
    out = f'{c.get("exported")} exported / {c.get("hf")} of peft\'s, {c.get("bit_exact")} bit-exact'
    for k in ("missing", "extra", "shape_mismatch"):
        if c.get(k):
            out += f"; {k.replace('_', ' ')}: {', '.join(c[k][:3])}{' …' if len(c[k]) > 3 else ''}"
    return out


def section(results: dict) -> str:
    lora = results.get("lora")
    if not isinstance(lora, dict):
        return ""
    from parity.engine import adapters as A  # the adapter names' rules (it imports torch: only for a LoRA run's page)

    rows = S.modules(results)
    by = {(r.get("mode"), r.get("name")): r for r in rows}
    logits = lambda k: lora.get(k) or {}  # noqa: E731
    cfg = lora.get("config") or {}
    kv = [("targets (HF)", ", ".join(lora.get("targets") or [])),
          ("rank / alpha / scale", f'{lora.get("r")} / {lora.get("alpha")} / {lora.get("scale")}'),
          ("dropout", lora.get("dropout")),
          ("exported adapter_config", f'r {cfg.get("r")}, alpha {cfg.get("lora_alpha")}, dropout '
                                      f'{cfg.get("lora_dropout")}, target_modules {cfg.get("target_modules")}'
                                      + (f', target_parameters {cfg["target_parameters"]}'
                                         if cfg.get("target_parameters") else "")),
          ("adapter export", _counts(lora.get("export"))),
          ("loads into peft", lora.get("export_loads")),
          ("its logits (peft + the export) vs HF with adapters / vs the system",
           f'{S.fmt(logits("export_logits").get("vs_peft_rel_l2"))} / '
           f'{S.fmt(logits("export_logits").get("vs_system_rel_l2"))}'),
          ("merged export vs peft merge_and_unload", _counts(lora.get("merged"))),
          ("merged model's logits vs peft's merged / vs the system",
           f'{S.fmt(logits("merged_logits").get("vs_peft_rel_l2"))} / '
           f'{S.fmt(logits("merged_logits").get("vs_system_rel_l2"))}')]
    if lora.get("system_parked"):  # the system stepped aside for HF's copies (an 80 GB card at full size)
        kv.append(("the system's weights during this check", lora["system_parked"]))
    table = "".join(f'<tr><th style="text-align:left;font-weight:500">{_e(k)}</th><td>{_e(v)}</td></tr>'
                    for k, v in kv)
    names = [r.get("name") for r in rows if r.get("mode") == "adapter_export"]
    per = "".join(
        f'<tr><td><code>{_e(n)}</code></td>{_cell(by.get(("adapter_export", n)))}'
        f'{_cell(by.get(("param_grad", A.param_key(n))) if ".lora_" in n else None)}'
        f'{_cell(by.get(("adapter_merged", A.adapted_weight(n))) if ".lora_" in n else None)}</tr>'
        for n in names)
    return (f'<section id="lora"><h2>LoRA<span class="sub">{len(names)} adapter tensors · the module table lists '
            f'every row</span></h2><table style="table-layout:fixed;width:100%"><tbody>{table}</tbody></table>'
            f'<table><thead><tr><th>adapter tensor</th><th>export</th><th>gradient</th><th>merged weight</th></tr>'
            f'</thead><tbody>{per}</tbody></table></section>')

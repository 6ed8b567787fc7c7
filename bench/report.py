"""The table ``python -m bench`` prints (and the README's table is made from)."""

from __future__ import annotations

from typing import Any


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def render_table(doc: dict[str, Any]) -> str:
    m, v = doc["machine"], doc["versions"]
    lines = [f"cloudckpt benchmark ({doc['benchmark']['mode']} mode, {doc['benchmark']['config']['reps']} reps) on "
             f"{m['cpu']}, {m['usable_cores']} cores, {m['memory_gib']} GiB; "
             f"tensorflow {v.get('tensorflow-cpu') or v.get('tensorflow', '?')}, s3fs {v.get('s3fs', '?')}, "
             f"boto3 {v.get('boto3', '?')}, moto {v.get('moto', '?')}",
             f"load average (1/5/15 min) at start {m.get('load_average_at_start')}, at end "
             f"{m.get('load_average_at_end')}; {doc['benchmark'].get('seconds', 0):.0f} s", ""]
    head = f"{'scenario':<30} {'figure':<34} {'median':>10} {'spread (min..max)':>22}  unit"
    lines += [head, "-" * len(head)]
    for key, sc in doc["scenarios"].items():
        if "error" in sc:
            lines.append(f"{key:<30} FAILED: {sc['error'].strip().splitlines()[-1]}")
            continue
        server = (sc.get("params") or {}).get("server")
        title = sc["title"] + (f" @{server}" if server not in (None, "moto") else "")
        for name, fig in sc["figures"].items():
            spread = f"{_num(fig['min'])}..{_num(fig['max'])}"
            lines.append(f"{title:<30} {name:<34} {_num(fig['median']):>10} {spread:>22}  {fig['unit']}")
            title = ""
        for name, r in sc["ratios"].items():
            paired = r.get("paired")
            spread = f"{_num(paired['min'])}..{_num(paired['max'])}" if paired else ""
            verdict = "" if r["met"] is None else ("  target " + r["target"] + (" MET" if r["met"] else " MISSED"))
            lines.append(f"{title:<30} {'ratio ' + name:<34} {_num(r['value']):>10} {spread:>22}  x{verdict}")
            title = ""
        lines.append("")
    return "\n".join(lines)

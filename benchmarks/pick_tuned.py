"""Pick a tuned hyperparameter from a tuning grid's results (issue 14): for each rule family
and distribution, the candidate with the highest worst-case accuracy over the grid's attacks;
a tie goes to the smaller value. A benchmark helper, not part of the package.

A candidate is a grid row whose rule label carries its value in parentheses:
``centered_clipping(tau=0.3)`` is family ``centered_clipping``, value 0.3;
``clipping(3)+nnm>trimmed_mean`` is family ``clipping+nnm>trimmed_mean``, value 3. A failed
cell (a round that could not close: the model diverged) counts as accuracy 0.

    python benchmarks/pick_tuned.py RESULTS.csv [RESULTS.csv ...] [--out FILE.md]

Prints (and with --out writes) a Markdown table per family and distribution: every
candidate's accuracy per attack, its worst case, and the choice.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

CANDIDATE = re.compile(r"^(?P<head>[^()]*)\((?P<inner>[^()]*)\)(?P<tail>.*)$")


def family_and_value(rule: str) -> tuple[str, str, float]:
    """``(family, value text, value)`` of a candidate label.

    Raises:
        ValueError: the label has no ``(...)`` with a number in it.
    """
    m = CANDIDATE.match(rule)
    nums = re.findall(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", m["inner"]) if m else []
    if not m or not nums:
        raise ValueError(f"rule label {rule!r} carries no candidate value in parentheses")
    return m["head"] + m["tail"], m["inner"], float(nums[-1])


def pick(rows: list[dict]) -> list[str]:
    """Markdown lines: per (distribution, family), the candidates and the choice."""
    by: dict[tuple[str, str], dict[str, dict]] = {}
    attacks: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        fam, inner, value = family_and_value(r["rule"])
        key = (r["distribution"], fam)
        cand = by.setdefault(key, {}).setdefault(inner, {"value": value, "acc": {}})
        acc = float(r["final_accuracy"]) if r["status"] == "ok" and r["final_accuracy"] else 0.0
        cand["acc"][r["attack"]] = acc
        attacks.setdefault(key, [])
        if r["attack"] not in attacks[key]:
            attacks[key].append(r["attack"])
    lines = []
    for (dist, fam), cands in by.items():
        atks = attacks[(dist, fam)]
        complete = {k: c for k, c in cands.items() if all(a in c["acc"] for a in atks)}
        best = max(complete.items(), key=lambda kv: (min(kv[1]["acc"].values()),
                                                     -kv[1]["value"]))[0] if complete else None
        lines += [f"### {fam} ({dist})", "",
                  "| candidate | " + " | ".join(atks) + " | worst case | |",
                  "|---|" + "---|" * (len(atks) + 2)]
        for inner, c in sorted(cands.items(), key=lambda kv: kv[1]["value"]):
            vals = [c["acc"].get(a) for a in atks]
            worst = min(v for v in vals if v is not None) if any(v is not None for v in vals) \
                else None
            cells = [f"{v:.4f}" if v is not None else "not run" for v in vals]
            mark = "**chosen**" if inner == best else ("" if inner in complete else "incomplete")
            lines.append(f"| {inner} | " + " | ".join(cells)
                         + f" | {worst:.4f} | {mark} |" if worst is not None else
                         f"| {inner} | " + " | ".join(cells) + f" | | {mark} |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="results.csv of tuning grids")
    ap.add_argument("--out", type=Path, help="also write the Markdown here")
    args = ap.parse_args(argv)
    rows = []
    try:
        for p in args.results:
            with open(p, newline="", encoding="utf-8") as fh:
                rows += list(csv.DictReader(fh))
        if not rows:
            print(f"pick_tuned: no results in {', '.join(map(str, args.results))}",
                  file=sys.stderr)
            return 1
        text = "\n".join(pick(rows)) + "\n"
    except KeyError as e:
        print(f"pick_tuned: not a byzps grid results.csv: no column {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, csv.Error) as e:   # UnicodeDecodeError is a ValueError
        print(f"pick_tuned: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""README's row for one full run of `benchmarks.peers`, read from the RESULTS.md it wrote.

    python -m benchmarks.summary              # the RESULTS.md of the last commit that changed it
    python -m benchmarks.summary 4ae1011      # the one a commit holds

The row is built from the run's results table alone (medians, best peer, and the ratios the run worked
out from unrounded medians), so no figure in README's table is typed by hand: W1 one by one as jobs a
second, share of raw and ratio to the best peer; W1 bulk's ratio; W2 tuned with its ratio and share of
raw; W3 beside the best peer's; W4 p50 / p99 with saq's in brackets; W2 RSS beside saq's; and W5 as two
workers' rate against one's.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = "benchmarks/RESULTS.md"
COLUMNS = ("one", "bulk", "w2_default", "w2_tuned", "rss", "w3", "p50", "p99", "w5")
LABEL_WIDTH, CELL_WIDTH = 11, 14  # how benchmarks.peers lays the table out
TIMES, MINUS = "\u00d7", "\u2212"  # README's typography

# Machines by (vendor, CPU family, model) as RESULTS.md names them; older RESULTS.md files name no
# model, and README names those machines by what raw drained there.
MACHINES = {
    ("AMD", "25", "17"): "model-17 EPYC",
    ("AMD", "25", "1"): "model-1 EPYC",
    ("AMD", "26", "2"): "family-26 EPYC",
    ("AMD", "23", "1"): "family-23 EPYC",
    ("Intel", "6", "167"): "model-167 Xeon",
    ("Intel", "6", "207"): "model-207 Xeon",
}


def _percent(share: float) -> str:
    """Whole percents, or tenths where a whole would round to 0 (a bare "0%" hides which way it went)."""
    whole = round(100 * share)
    return str(whole) if whole else f"{100 * share:.1f}"


def results_text(commit: str | None) -> tuple[str, str]:
    """The RESULTS.md a commit holds (default: the last that changed it), and the commit's short id."""
    if commit is None:
        commit = _git("log", "-1", "--format=%h", "--", RESULTS).strip()
        if not commit:
            raise SystemExit(f"no commit holds {RESULTS}")
    short = _git("rev-parse", "--short", commit).strip()
    return _git("show", f"{commit}:{RESULTS}"), short


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def parse_table(text: str) -> dict[str, dict[str, str]]:
    """The results table's rows by library (and "best peer", "aq/best"), footnote marks dropped."""
    if "Command: `python -m benchmarks.peers`" not in text:
        raise SystemExit("not a full run's RESULTS.md (its command had options)")
    block = text.split("## Results", 1)[1].split("```", 2)[1]
    rows: dict[str, dict[str, str]] = {}
    for line in block.splitlines():
        if not line.strip() or line.startswith(("-", "  min-max", "[")):
            continue
        cells = [line[LABEL_WIDTH + CELL_WIDTH * i: LABEL_WIDTH + CELL_WIDTH * (i + 1)].strip()
                 for i in range(len(COLUMNS))]
        rows[line[:LABEL_WIDTH].strip()] = {
            name: re.sub(r"\[\d+\]", "", cell) for name, cell in zip(COLUMNS, cells, strict=True)}
    return rows


def machine_name(text: str) -> str:
    line = next((ln for ln in text.splitlines() if ln.startswith("- Machine:")), "")
    vendor = "Intel" if "Intel" in line else "AMD" if "AMD" in line else "?"
    found = re.search(r"family (\d+), model (\d+)", line)
    if found is None:
        return f"{vendor} (model not recorded)"
    family, model = found.groups()
    return MACHINES.get((vendor, family, model), f"{vendor} family {family}, model {model}")


def number(cell: str) -> float:
    """A table cell as a number: "7,985" and "73.1k" alike."""
    cell = cell.replace(",", "")
    if cell.endswith("k"):
        return float(cell[:-1]) * 1000
    return float(cell)


def row(text: str, label: str) -> str:
    rows = parse_table(text)
    aq, raw, saq = rows["aqueue"], rows["raw"], rows["saq"]
    best, ratio, to_raw = rows["best peer"], rows["aq/best"], rows["aq/raw"]

    def of_raw(column: str) -> str:
        return f"{round(100 * float(to_raw[column]))}% of raw"

    w3_best = best["w3"]
    w5 = number(aq["w5"]) / number(aq["w2_tuned"]) - 1
    cells = [
        label,
        raw["w2_tuned"],
        f"{aq['one']}: {of_raw('one')}, {ratio['one']}{TIMES} {best['one']}",
        f"{ratio['bulk']}{TIMES} {best['bulk']}",
        f"{aq['w2_tuned']}: {ratio['w2_tuned']}{TIMES} {best['w2_tuned']}, {of_raw('w2_tuned')}",
        f"{aq['w3']} / {w3_best} {rows[w3_best]['w3']}",
        f"{aq['p50']} / {aq['p99']} ({saq['p50']} / {saq['p99']})",
        f"{aq['rss']} / {saq['rss']}",
        f"{'+' if w5 >= 0 else MINUS}{_percent(abs(w5))}%",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commit", nargs="?",
                        help="a commit holding the RESULTS.md (default: the last that changed it)")
    args = parser.parse_args()
    text, short = results_text(args.commit)
    print(row(text, f"{machine_name(text)} ({short})"))


if __name__ == "__main__":
    main()

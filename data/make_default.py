"""Write minorsft's bundled default: a small instruction set and a tiny Qwen2 model.

    python data/make_default.py            # rewrites data/default/ deterministically

Everything is generated here from fixed seeds; nothing comes from a hub.

- ``train.jsonl``: 320 chat records (``messages``: system prompts, single and multi-turn)
  of small tasks a tiny model can visibly learn (arithmetic, reversing, sorting,
  counting, spelling out lists), answers from 2 to ~60 tokens, plus a handful of
  deliberately bad rows so that every run shows the rejects file at work.
- ``train_alpaca.json`` and ``train_prompt_completion.jsonl``: the same kind of tasks
  in the other two record formats (for trying ``--format``).
- ``target.jsonl``: 64 held-out records of the same tasks (the "target set" whose loss
  the reproduction reports).
- ``model/``: a BPE tokenizer trained on the generated text with Qwen2's ChatML
  template, and a 2-layer Qwen2 briefly pre-trained on plain text and on chat
  transcripts of four of the six tasks. Like an instruct model before further
  fine-tuning, the reference already answers some of the training set well and the
  rest badly: the situation MinorSFT's per-sample coefficient is made for.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "default"
sys.path.insert(0, str(HERE.parent))

COLORS = "red blue green yellow black white orange purple".split()
ANIMALS = "cat dog fox bird fish horse sheep goat mouse lion tiger bear".split()
NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()
SYSTEMS = ["You are a careful assistant.", "Answer briefly.", "You are a math tutor."]


PRETRAINED_KINDS = range(4)  # the tasks the reference has seen (in chat form) before fine-tuning


def task(rng: random.Random, kinds=range(6)) -> tuple[str, str]:
    kind = rng.choice(kinds)
    if kind == 0:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        words = rng.sample(COLORS + ANIMALS, rng.randint(2, 6))
        return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))
    if kind == 2:
        numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 8))]
        return f"Sort these numbers: {' '.join(map(str, numbers))}", " ".join(map(str, sorted(numbers)))
    if kind == 3:
        words = [rng.choice(ANIMALS) for _ in range(rng.randint(1, 10))]
        n = len(words)
        return f"How many words are in: {' '.join(words)}", f"There {'is' if n == 1 else 'are'} {n} word{'s' * (n != 1)}."
    if kind == 4:
        n = rng.randint(2, 10)
        return f"Count from one to {NUMBER_WORDS[n]}.", ", ".join(NUMBER_WORDS[1 : n + 1]) + "."
    animals = rng.sample(ANIMALS, rng.randint(3, 8))
    lines = [f"{k + 1}. The {animal} is {rng.choice(COLORS)}." for k, animal in enumerate(animals)]
    return f"Describe {len(animals)} animals, one per line.", "\n".join(lines)


def chat_record(rng: random.Random, k: int) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    for _ in range(1 if rng.random() < 0.75 else rng.randint(2, 3)):
        prompt, answer = task(rng)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"id": f"chat-{k:04d}", "messages": messages}


BAD_ROWS = [
    '{"id": "bad-json", "messages": [',
    '{"id": "no-answer", "messages": [{"role": "user", "content": "What is 1 plus 1?"}]}',
    '{"id": "empty-answer", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}',
    '{"id": "bad-role", "messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}',
]


def pretraining_text(rng: random.Random, n: int) -> list[str]:
    """Plain sentences over the tasks' vocabulary, not in the tasks' question/answer form."""
    vocab = COLORS + ANIMALS + NUMBER_WORDS + "the a is are and or of to in from which what how many".split()
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 25))).capitalize() + "." for _ in range(n)]


def write_data(rng: random.Random) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps(chat_record(rng, k)) for k in range(320)]
    for k, bad in enumerate(BAD_ROWS):
        rows.insert(40 + 70 * k, bad)
    (OUT / "train.jsonl").write_text("\n".join(rows) + "\n")
    (OUT / "target.jsonl").write_text(
        "\n".join(json.dumps({**chat_record(rng, k), "id": f"target-{k:03d}"}) for k in range(64)) + "\n"
    )
    alpaca = []
    for k in range(64):
        prompt, answer = task(rng)
        head, _, tail = prompt.partition(": ")
        alpaca.append({"id": f"alpaca-{k:03d}", "instruction": head if tail else prompt, "input": tail, "output": answer})
    (OUT / "train_alpaca.json").write_text(json.dumps(alpaca, indent=1) + "\n")
    lines = []
    for k in range(64):
        prompt, answer = task(rng)
        lines.append(json.dumps({"id": f"pc-{k:03d}", "prompt": prompt, "completion": answer}))
    (OUT / "train_prompt_completion.jsonl").write_text("\n".join(lines) + "\n")


def write_model(rng: random.Random, steps: int = 600) -> None:
    import torch
    from tiny_models import build_model, build_tokenizer

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    corpus = pretraining_text(rng, 3000)
    task_text = [f"{p} {a}" for p, a in (task(random.Random(s)) for s in range(500))]
    tokenizer = build_tokenizer(corpus + task_text + ["\n".join(SYSTEMS)], vocab_size=640)
    # Head size 128/4 = 32: the smallest vLLM's CPU attention runs.
    model = build_model(tokenizer, seed=0, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=256, max_position_embeddings=512)
    # Pre-training: plain text, and chat transcripts of the first four tasks (a different
    # random stream than the fine-tuning set), with the loss on every token.
    chats = []
    for _ in range(3000):
        prompt, answer = task(rng, PRETRAINED_KINDS)
        chats.append(tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = [rng.choice(corpus) if rng.random() < 0.3 else rng.choice(chats) for _ in range(16)]
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            print(f"pre-training step {step}: loss {loss.item():.3f}")
    model.eval()
    model.generation_config.do_sample = False
    model.save_pretrained(OUT / "model")
    tokenizer.save_pretrained(OUT / "model")


def main() -> None:
    write_data(random.Random(2408))
    write_model(random.Random(10642))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

"""Train the testbed model from scratch on the synthetic task suite (CPU friendly).

Usage (the shipped model was trained with the defaults)::

    python -m sparkkv.testbed.train                      # writes src/sparkkv/testbed/model/
    python -m sparkkv.testbed.train --out runs/try --steps 600 --stages 128:0.5,256:0.5

Recipe (see ``docs/testbed.md`` for the calibration behind it):

* a small Llama (RoPE, grouped-query attention, head_dim 64) with a closed word-level vocabulary;
* every training sequence is one task instance in evaluation format followed by extra questions
  about the same document (denser supervision); the loss is the cross-entropy on the answer tokens
  plus a small weight on the language-modelling loss of the other tokens;
* attention supervision: an auxiliary loss asks head 0 of layer 0 to attend to the previous token
  and head 0 of layer 1 to attend to the token after an earlier occurrence of the current token
  (the two halves of an induction head, which retrieval needs). Without it the answer loss sits
  on a plateau at chance level (copy *some* value of the context) for longer than the CPU budget;
  with it the circuit forms in a few hundred steps. All weights start random and are trained;
* a context-length curriculum (short sequences first), constant tokens per step, AdamW with linear
  warm-up and cosine decay, bf16 autocast for the matmuls (fp32 master weights);
* seeded: sequence ``i`` of step ``s`` is a pure function of ``(seed, s, i)``, and training seeds are
  ``>= tasks.TRAIN_SEED_START`` so evaluation samples (seeds below it) are never seen in training.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from . import haystack, tasks, vocab
from .tokenizer import build_tokenizer

MODEL_DIR = Path(__file__).resolve().parent / "model"
# Curriculum: associative recall ("lookup") + passkey on short sequences, then the retrieval tasks,
# then all tasks with the context growing to 1,024 tokens (fractions are relative step counts).
DEFAULT_STAGES = (
    "64:300:2048:lookup8=2/passkey=1/repeat=0.5,"
    "128:350:4096:lookup=1/passkey=1/multikey=2/kv_retrieval=2/repeat=0.5,"
    "256:350:8192,512:350:8192,1024:350:8192"
)
AUX_TASKS = ("echo", "repeat", "lookup")  # training-only tasks, see echo_sequence, repeat_sequence, lookup_sequence
CURVE_EVAL_SEED = 777  # evaluation seed of the learning-curve checkpoints (final numbers use others)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sparkkv.testbed.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=MODEL_DIR, help="output folder (default: the shipped model folder)")
    p.add_argument("--seed", type=int, default=0, help="run seed (training sequences use TRAIN_SEED_START + seed)")
    p.add_argument("--steps", type=int, default=1700)
    p.add_argument("--stages", default=DEFAULT_STAGES,
                   help="curriculum 'seq_len:fraction_of_steps,...'; the last seq_len is the training context")
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--lm-weight", type=float, default=0.1, help="weight of the LM loss on non-answer tokens")
    p.add_argument("--attention-weight", type=float, default=1.0,
                   help="weight of the attention-supervision loss (previous-token + induction head; 0: off)")
    p.add_argument("--task-weights", default="passkey:1,repeat:0.5,lookup:1,multikey:2,kv_retrieval:3,variable_tracking:1,common_words:1",
                   help="task mixture of the stages that do not set their own")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--tie", type=int, default=1, help="tie input and output embeddings (1/0): copying is easier")
    p.add_argument("--group-std", type=float, default=0.02, help="std of the shared per-group embedding (0: plain init)")
    p.add_argument("--token-std", type=float, default=0.02, help="std of the individual embedding part")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--bf16", type=int, default=1, help="bf16 autocast for training matmuls (1/0)")
    p.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-n", type=int, default=24, help="samples per task at each learning-curve checkpoint")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    return p.parse_args(argv)


def parse_weights(spec: str, sep: str = ",", eq: str = ":") -> dict[str, float]:
    """``"passkey:1,multikey:2"`` -> ``{"passkey": 1.0, "multikey": 2.0}`` (task names validated)."""
    weights = {}
    for item in spec.split(sep):
        task, value = item.split(eq)
        if task not in AUX_TASKS and not (task.startswith("lookup") and task[6:].isdigit()):
            tasks.check_task(task)
        weights[task] = float(value)
    return weights


def parse_stages(spec: str, steps: int, batch_tokens: int, weights: dict[str, float], lm_weight: float) -> list[dict]:
    """Curriculum stages from ``"seq_len:fraction[:tokens_per_step[:task=w/task=w...[:lm_weight]]]",...``.

    ``fraction`` is the share of the optimizer steps; ``tokens_per_step`` defaults to
    ``batch_tokens``, the task mixture to ``weights`` and the LM-loss weight to ``lm_weight``.
    """
    items = [s.split(":") for s in spec.split(",")]
    total = sum(float(item[1]) for item in items)
    out, start = [], 0.0
    for item in items:
        out.append({
            "seq_len": int(item[0]),
            "first_step": round(start * steps),
            "batch_tokens": int(item[2]) if len(item) > 2 and item[2] else batch_tokens,
            "weights": parse_weights(item[3], "/", "=") if len(item) > 3 and item[3] else dict(weights),
            "lm_weight": float(item[4]) if len(item) > 4 else lm_weight,
        })
        start += float(item[1]) / total
    return out


def stage_at(stages: list[dict], step: int) -> dict:
    return [stage for stage in stages if stage["first_step"] <= step][-1]


def token_groups() -> torch.Tensor:
    """Group id of every token: 0 special/punctuation/grammar words, 1 numbers, 2 names."""
    numbers, names = set(vocab.NUMBERS), set(vocab.NAMES)
    return torch.tensor([1 if w in numbers else 2 if w in names else 0 for w in vocab.all_words()])


@torch.no_grad()
def structured_embedding_init(model, group_std: float, token_std: float, generator: torch.Generator) -> None:
    """Embedding = shared random vector of the token's group + an individual random vector.

    With a plain random init every number (or name) token must learn on its own that it is a
    value (or key); they appear rarely, so retrieval circuits form slowly. A shared group component
    lets attention find "the number after this key" for all values at once, while the individual
    components keep tokens distinguishable (and, with tied embeddings, copyable).
    """
    emb = model.get_input_embeddings().weight
    groups = token_groups()
    shared = torch.randn(int(groups.max()) + 1, emb.shape[1], generator=generator) * group_std
    emb.copy_(shared[groups] + torch.randn(emb.shape, generator=generator) * token_std)


def model_config(args: argparse.Namespace, seq_len: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(vocab.all_words()),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=seq_len,
        rope_theta=args.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=bool(args.tie),
        bos_token_id=vocab.SPECIAL_TOKENS.index(vocab.BOS),
        eos_token_id=vocab.SPECIAL_TOKENS.index(vocab.EOS),
        pad_token_id=vocab.SPECIAL_TOKENS.index(vocab.PAD),
    )


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def _options(task: str, rng: random.Random, seq_len: int) -> tuple[int, dict]:
    """Random (n_queries, builder options) for one training sequence; evaluation settings are common."""
    if task == "multikey":
        needles = rng.randint(2, 8)
        return rng.randint(1, needles), {"needles": needles}
    if task == "kv_retrieval":
        return rng.randint(1, max(1, seq_len // 64)), {}
    if task == "variable_tracking":
        if rng.random() < 0.5:
            chains, length = tasks.VT_CHAINS, tasks.VT_CHAIN_LENGTH
        else:
            chains, length = rng.randint(1, 3), rng.randint(2, 5)
        return rng.randint(1, chains), {"chains": chains, "length": length}
    return 1, {}


def repeat_sequence(seq_len: int, seed: int, index: int) -> tuple[list[str], list[bool]]:
    """Auxiliary training-only task: a random list of names and numbers, then the same list again.

    Every token of the second copy is predictable by one induction step (find the earlier
    occurrence of the current token, copy the token after it) -- the circuit that multikey and
    kv_retrieval need. Supervising all of them forms induction heads much faster than the sparse
    answers of the real tasks alone. The list length and the haystack around the two copies are
    random, so the distance between the copies varies and a fixed-offset copy does not work.
    """
    rng = random.Random(f"sparkkv-testbed-repeat:{seed}:{seq_len}:{index}")
    intro, middle = "Here is a list of words :".split(), ".", 
    again = "Read the list above :".split()
    fixed = 1 + len(intro) + 1 + len(again) + 2  # bos, intro, ".", again, ".", eos
    room = seq_len - fixed
    n = rng.randint(min(4, room // 2), room // 2)
    hay = room - 2 * n
    first = rng.randint(0, hay)
    if 0 < first < haystack.MIN_SENTENCE or 0 < hay - first < haystack.MIN_SENTENCE:
        first = 0 if hay - 0 >= haystack.MIN_SENTENCE or hay == 0 else hay
    if 0 < hay < haystack.MIN_SENTENCE:  # cannot be filled: lengthen the list instead
        n += hay // 2
        hay, first = hay % 2, 0
    items = [rng.choice(vocab.NAMES) if rng.random() < 0.5 else rng.choice(vocab.NUMBERS) for _ in range(n)]
    before = [w for x in haystack.sentences(rng, first) for w in x]
    between = [w for x in haystack.sentences(rng, hay - first) for w in x] if hay - first != 1 else []
    words = [vocab.BOS, *before, *intro, *items, ".", *between, *again]
    mask = [False] * len(words) + [True] * (n + 2)
    words += items + [".", vocab.EOS]
    words += [vocab.PAD] * (seq_len - len(words))
    mask += [False] * (seq_len - len(mask))
    return words, mask


def echo_sequence(seq_len: int, seed: int, index: int) -> tuple[list[str], list[bool]]:
    """Auxiliary training-only task: pairs ``x = x ,`` of random names and numbers.

    The token after ``=`` is the token just before it, so a head that attends to the previous
    position solves it in one step. Such previous-token heads are the first half of the induction
    circuit that ``repeat``, ``multikey`` and ``kv_retrieval`` need; this task gives them a direct
    training signal instead of waiting for them to emerge.
    """
    rng = random.Random(f"sparkkv-testbed-echo:{seed}:{seq_len}:{index}")
    words = [vocab.BOS, *"Here is a list of words :".split()]
    mask = [False] * len(words)
    while len(words) + 4 <= seq_len:
        x = rng.choice(vocab.NAMES) if rng.random() < 0.5 else rng.choice(vocab.NUMBERS)
        words += [x, "=", x, ","]
        mask += [False, False, True, False]
    words += [vocab.PAD] * (seq_len - len(words))
    mask += [False] * (seq_len - len(mask))
    return words, mask


def lookup_sequence(seq_len: int, seed: int, index: int, max_pairs: int | None = None) -> tuple[list[str], list[bool]]:
    """Auxiliary training-only task (multi-query associative recall): a dictionary of ``key value``
    pairs, then ``Answer :`` and keys asked again in random order, each followed by its value.

    Every supervised value is found by one content-based induction step: attend to the earlier
    occurrence of the current key, copy the token after it -- exactly what kv_retrieval and
    multikey answer with, but with one supervised answer per two tokens instead of one per
    sequence. The number of pairs varies, so neither positions nor offsets give the answer.
    """
    rng = random.Random(f"sparkkv-testbed-lookup:{seed}:{seq_len}:{index}")
    intro = "Here is a dictionary of keys and values :".split()
    room = seq_len - 1 - len(intro) - 3  # bos, intro, ".", "Answer", ":"
    pairs = rng.randint(2, max(2, min(room // 4, max_pairs or room)))
    keys = rng.sample(vocab.NAMES, pairs)
    values = [rng.choice(vocab.NUMBERS) for _ in keys]
    words = [vocab.BOS, *intro]
    for k, v in zip(keys, values):
        words += [k, v]
    words += [".", "Answer", ":"]
    mask = [False] * len(words)
    while len(words) + 2 <= seq_len:
        j = rng.randrange(pairs)
        words += [keys[j], values[j]]
        mask += [False, True]
    words += [vocab.PAD] * (seq_len - len(words))
    mask += [False] * (seq_len - len(mask))
    return words, mask


def training_example(task: str, seq_len: int, seed: int, index: int) -> tuple[list[str], list[bool]]:
    """One training sequence; shrinks the instance until it fits ``seq_len``."""
    if task.startswith("lookup"):  # "lookup": up to seq_len/4 pairs; "lookup8": 2-8 pairs
        return lookup_sequence(seq_len, seed, index, int(task[6:]) if task[6:] else None)
    if task == "repeat":
        return repeat_sequence(seq_len, seed, index)
    if task == "echo":
        return echo_sequence(seq_len, seed, index)
    rng = random.Random(f"sparkkv-testbed-options:{seed}:{index}")
    n_queries, options = _options(task, rng, seq_len)
    while True:
        try:
            return tasks.training_sequence(task, seq_len, seed, index, n_queries=n_queries, **options)
        except ValueError:
            if n_queries > 1:
                n_queries -= 1
            elif options.get("needles", 2) > 2:
                options["needles"] -= 1
            elif options.get("length", 2) > 2:
                options["length"] -= 1
            elif options.get("chains", 1) > 1:
                options["chains"] -= 1
            else:
                raise


class Batcher:
    """Deterministic stream of training batches (token ids, answer mask)."""

    def __init__(self, seed: int):
        self.seed = tasks.TRAIN_SEED_START + seed
        self.ids = {w: i for i, w in enumerate(vocab.all_words())}

    def batch(self, step: int, batch_size: int, seq_len: int, weights: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
        rng = random.Random(f"sparkkv-testbed-batch:{self.seed}:{step}")
        names = list(weights)
        ids, masks = [], []
        for i in range(batch_size):
            task = rng.choices(names, [weights[t] for t in names])[0]
            words, mask = training_example(task, seq_len, self.seed, step * 10_000 + i)
            ids.append([self.ids[w] for w in words])
            masks.append(mask)
        return torch.tensor(ids), torch.tensor(masks)


def loss_fn(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, lm_weight: float) -> tuple[torch.Tensor, float]:
    """Mean CE on answer tokens + ``lm_weight`` * mean CE on the other tokens (next-token targets)."""
    logits = logits[:, :-1].float()
    target = ids[:, 1:]
    answer = mask[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="none")
    ce = ce.view_as(target)
    answer_loss = ce[answer].mean()
    loss = answer_loss + lm_weight * ce[~answer].mean() if lm_weight > 0 else answer_loss
    return loss, answer_loss.item()


PREV_HEAD = (0, 0)  # (layer, head) supervised to attend to the previous token
INDUCTION_HEAD = (1, 0)  # (layer, head) supervised to attend to the token after an earlier occurrence


def attention_loss(attentions: tuple[torch.Tensor, ...], ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Auxiliary losses that form an induction circuit: ``(previous_token_loss, induction_loss)``.

    ``attentions[l]`` is layer ``l``'s attention probabilities ``(batch, heads, seq, seq)`` and
    ``ids`` the ``(batch, seq)`` token ids. Previous-token loss: mean ``-log p[i, i-1]`` of
    :data:`PREV_HEAD`. Induction loss: for every position ``i`` (not a special token) whose token
    occurred before, ``-log`` of the probability mass :data:`INDUCTION_HEAD` puts on the positions
    ``j <= i`` whose previous token equals token ``i`` -- the value after a key, when ``i`` is a
    queried key. The mass (not a fixed target distribution) is supervised, so the head may
    concentrate on any of the earlier occurrences.
    """
    prev = attentions[PREV_HEAD[0]][:, PREV_HEAD[1]].float()
    prev_loss = -prev.diagonal(offset=-1, dim1=1, dim2=2).clamp_min(1e-6).log().mean()
    ind = attentions[INDUCTION_HEAD[0]][:, INDUCTION_HEAD[1]].float()
    seq = ids.shape[1]
    before = torch.cat([torch.full_like(ids[:, :1], -1), ids[:, :-1]], dim=1)  # token before position j
    match = (before[:, None, :] == ids[:, :, None]) & torch.ones(seq, seq, dtype=torch.bool).tril()
    match &= (ids >= len(vocab.SPECIAL_TOKENS))[:, :, None]
    has = match.any(-1)
    if not has.any():
        return prev_loss, ind.sum() * 0.0
    mass = (ind * match).sum(-1)
    return prev_loss, -mass[has].clamp_min(1e-6).log().mean()


# --------------------------------------------------------------------------------------------------
# Learning-curve evaluation (teacher forced, batched: fast enough to run during training)
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def curve_eval(model, ids_of: dict[str, int], seq_len: int, n: int, seed: int, batch: int = 8) -> dict[str, float]:
    """Per-task accuracy on fresh samples, predicting every answer token from the gold prefix.

    For single-token answers this equals greedy generation; for multi-token answers it is the mean
    per-sample fraction of correctly predicted answer tokens (close to, not identical to, the recall
    of greedy generation measured by :func:`sparkkv.testbed.evaluate.evaluate`).
    """
    model.eval()
    out = {}
    for task in tasks.TASKS:
        samples = tasks.generate_samples(task, n, seq_len, seed)
        scores = []
        for k in range(0, n, batch):
            chunk = samples[k : k + batch]
            seqs = [[ids_of[vocab.BOS]] + [ids_of[w] for w in (s["prompt"] + " " + s["answer"]).split()] for s in chunk]
            x = torch.tensor(seqs)
            logits = model(input_ids=x).logits
            pred = logits.argmax(-1)
            for row, s in enumerate(chunk):
                a = s["answer_tokens"]
                hit = (pred[row, -a - 1 : -1] == x[row, -a:]).float()
                scores.append(hit.mean().item() if task in tasks.MULTI_ANSWER_TASKS else float(hit.all()))
        out[task] = sum(scores) / len(scores)
    model.train()
    return out


# --------------------------------------------------------------------------------------------------
# Main loop
# --------------------------------------------------------------------------------------------------
def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def save(model, args: argparse.Namespace, log: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.save_dtype)
    model.to(dtype).save_pretrained(args.out, safe_serialization=True)
    model.to(torch.float32)
    build_tokenizer().save_pretrained(args.out)
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def _optimizer(model, args) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))


def _train_step(model, opt, batcher, stage: dict, step: int, args) -> tuple[int, tuple]:
    """One optimizer step at the stage's length: `(tokens seen, (loss, answer loss, head losses...))`."""
    seq_len = stage["seq_len"]
    ids, mask = batcher.batch(step, max(1, stage["batch_tokens"] // seq_len), seq_len, stage["weights"])
    for group in opt.param_groups:
        group["lr"] = lr_at(step, args)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.bf16)):
        out = model(input_ids=ids, output_attentions=args.attention_weight > 0)
    loss, answer_loss = loss_fn(out.logits, ids, mask, stage["lm_weight"])
    head_losses = (float("nan"), float("nan"))
    if args.attention_weight > 0:
        prev_loss, induction_loss = attention_loss(out.attentions, ids)
        loss = loss + args.attention_weight * (prev_loss + induction_loss)
        head_losses = (prev_loss.item(), induction_loss.item())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return ids.numel(), (loss.item(), answer_loss, *head_losses)


def _train_entry(step: int, tokens: int, start: float, seq_len: int, args, recent: list[tuple]) -> dict:
    mean = lambda i: round(sum(r[i] for r in recent) / len(recent), 4)  # noqa: E731
    return {"step": step + 1, "tokens": tokens, "elapsed_s": round(time.time() - start, 1), "seq_len": seq_len,
            "lr": round(lr_at(step, args), 6), "loss": mean(0), "answer_loss": mean(1), "prev_head_loss": mean(2),
            "induction_head_loss": mean(3)}


def _eval_entry(model, ids_of, step: int, tokens: int, start: float, seq_len: int, context: int, args) -> dict:
    t0 = time.time()
    eval_len = max(seq_len, tasks.MIN_CONTEXT_TOKENS)
    entry = {"step": step + 1, "tokens": tokens, "elapsed_s": round(t0 - start, 1), "seq_len": eval_len,
             "accuracy": curve_eval(model, ids_of, eval_len, args.eval_n, CURVE_EVAL_SEED)}
    if eval_len < context:
        entry["accuracy_at_context"] = curve_eval(model, ids_of, context, args.eval_n, CURVE_EVAL_SEED)
    entry["eval_s"] = round(time.time() - t0, 1)
    return entry


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    stages = parse_stages(args.stages, args.steps, args.batch_tokens, parse_weights(args.task_weights), args.lm_weight)
    context = max(stages[-1]["seq_len"], tasks.MIN_CONTEXT_TOKENS)

    config = model_config(args, context)
    # Attention supervision needs the attention probabilities, which only the eager path returns.
    config._attn_implementation = "eager" if args.attention_weight > 0 else "sdpa"
    model = LlamaForCausalLM(config)
    if args.group_std > 0:
        structured_embedding_init(model, args.group_std, args.token_std, torch.Generator().manual_seed(args.seed))
    n_params = sum(p.numel() for p in model.parameters())
    opt = _optimizer(model, args)
    batcher = Batcher(args.seed)

    log = {
        "command": "python -m sparkkv.testbed.train " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: str(v) for k, v in vars(args).items()},
        "seed": args.seed,
        "train_seed_start": tasks.TRAIN_SEED_START,
        "curve_eval_seed": CURVE_EVAL_SEED,
        "curve_eval": "teacher-forced accuracy on eval_n fresh samples per task at the current seq_len and at the training context",
        "parameters": n_params,
        "context_tokens": context,
        "stages": stages,
        "hardware": hardware(),
        "train": [],
        "eval": [],
    }
    print(json.dumps({"parameters": n_params, "stages": stages}), flush=True)
    start, tokens, recent = time.time(), 0, []
    model.train()
    for step in range(args.steps):
        stage = stage_at(stages, step)
        seen, losses = _train_step(model, opt, batcher, stage, step, args)
        tokens += seen
        recent.append(losses)
        if (step + 1) % args.log_every == 0:
            log["train"].append(_train_entry(step, tokens, start, stage["seq_len"], args, recent))
            recent = []
            print(json.dumps(log["train"][-1]), flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            log["eval"].append(_eval_entry(model, batcher.ids, step, tokens, start, stage["seq_len"], context, args))
            print(json.dumps(log["eval"][-1]), flush=True)
            log["wall_time_s"] = round(time.time() - start, 1)
            save(model, args, log)
    log["wall_time_s"] = round(time.time() - start, 1)
    log["tokens"] = tokens
    save(model, args, log)
    print(json.dumps({"done": True, "wall_time_s": log["wall_time_s"], "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()

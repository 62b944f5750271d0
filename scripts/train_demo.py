#!/usr/bin/env python
"""Train the embedded demo model: a tiny Llama-style causal LM on the synthetic demo corpus.

How the shipped model is made (on one H100, about 8 minutes in all):

    python scripts/train_demo.py --minutes 6 --out kernels/pbs_kernels/demo_model

The corpus (pbs_kernels/demo.py) mixes grammar filler with key-value records and later
lookups, and quoted spans repeated much later, so the trained heads include local, sink and
long-range scattered retrieval heads: the patterns `pbs analyze` is meant to show. Training is
time-boxed: the learning-rate schedule (warmup, then cosine to 10%) and the sequence-length
curriculum (short documents first, then long) run on the fraction of the time budget spent, so
any `--minutes` gives a complete schedule. The loss up-weights the tokens that need retrieval
(`--answer-weight`). At the end it scores held-out documents at the training length and at twice
that (RoPE extrapolation), saves the model in bfloat16 with its tokenizer, and writes a model
card (README.md) and metrics.json with the numbers reached. The last line printed is
`FINAL ...` with loss and accuracies.

Needs only torch, transformers, tokenizers and safetensors; runs offline. On a CPU, for a smoke
test: `python scripts/train_demo.py --minutes 1 --seq-len 512 --batch-tokens 8192 --out /tmp/demo_model`.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import inspect
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import sys
import time
from array import array
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from pbs_kernels import demo
except ImportError:  # a checkout that was not pip-installed (e.g. the GPU machine)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
    from pbs_kernels import demo

# Architecture of the demo model. head_dim 64 is the smallest the PBS kernels take; 2 KV heads
# for 4 query heads exercise grouped-query attention; rope_theta and the position limit follow
# Llama 3 so long-prompt analysis at 32K is in range.
MODEL_CONFIG = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=32768,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)

# Document seeds: training draws from TRAIN_SEED_BASE up; demo_eval's held-out seeds start at
# 1_000_000 and the in-training probe uses PROBE_SEED, so no evaluated text is ever trained on.
TRAIN_SEED_BASE = 10_000_000
PROBE_SEED = 2_000_000


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Data: whole documents (each starts with BOS, so the sink forms at position 0), generated in
# worker processes while the GPU trains.


def make_batch(seq_len: int, seeds: list[int]) -> tuple[bytes, bytes]:
    """Token ids (int16) and token kinds (uint8) for one batch, as raw bytes (cheap to pickle)."""
    ids, kinds = array("h"), array("B")
    for seed in seeds:
        doc = demo.demo_doc(seq_len, seed)
        ids.extend(doc.ids)
        kinds.extend(doc.kinds)
    return ids.tobytes(), kinds.tobytes()


class BatchStream:
    """Prefetches batches from a process pool (or builds them inline with workers=0)."""

    def __init__(self, workers: int, seed: int, depth: int):
        self.pool = None
        if workers > 0:
            # spawn, not fork: the parent may already hold a CUDA context.
            self.pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
        self.depth = max(depth, 1) if self.pool else 1
        self.next_seed = TRAIN_SEED_BASE + seed * 100_000_000
        self.pending: list[tuple[int, list[int], cf.Future | None]] = []

    def _submit(self, seq_len: int, batch: int):
        seeds = list(range(self.next_seed, self.next_seed + batch))
        self.next_seed += batch
        job = self.pool.submit(make_batch, seq_len, seeds) if self.pool else None
        self.pending.append((seq_len, seeds, job))

    def get(self, seq_len: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Next batch as (ids int16 [b, n], kinds uint8 [b, n]). Batches queued before a phase
        change keep their old length (a few steps' worth)."""
        while len(self.pending) < self.depth:
            self._submit(seq_len, batch)
        n, seeds, job = self.pending.pop(0)
        if self.pool:
            self._submit(seq_len, batch)
        raw_ids, raw_kinds = job.result() if job is not None else make_batch(n, seeds)
        ids = torch.frombuffer(bytearray(raw_ids), dtype=torch.int16).view(len(seeds), n)
        kinds = torch.frombuffer(bytearray(raw_kinds), dtype=torch.uint8).view(len(seeds), n)
        return ids, kinds

    def prime(self, seq_len: int, batch: int):
        """Queue the first batches and wait for one, so worker start-up (each imports torch) is
        not charged to the training time budget."""
        while len(self.pending) < self.depth:
            self._submit(seq_len, batch)
        if self.pending[0][2] is not None:
            self.pending[0][2].result()

    def close(self):
        if self.pool:
            self.pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Schedules, all functions of the fraction of the time budget spent.


def parse_phases(text: str | None, seq_len: int) -> list[tuple[int, float]]:
    """'1024:0.25,4096:0.35,8192:0.4' -> [(len, fraction)], fractions normalised to sum 1."""
    if not text:
        short, mid = max(seq_len // 8, 128), max(seq_len // 2, 128)
        text = f"{short}:0.25,{mid}:0.35,{seq_len}:0.4"
    phases = []
    for part in text.split(","):
        length, _, frac = part.partition(":")
        phases.append((int(length), float(frac or 1)))
    total = sum(f for _, f in phases)
    if total <= 0 or any(n < 16 or f < 0 for n, f in phases):
        raise SystemExit(f"--phases {text!r}: lengths must be >= 16 and fractions >= 0")
    return [(n, f / total) for n, f in phases]


def phase_at(phases: list[tuple[int, float]], frac: float) -> int:
    acc = 0.0
    for n, f in phases:
        acc += f
        if frac < acc:
            return n
    return phases[-1][0]


def lr_at(frac: float, peak: float, warmup: float, floor: float) -> float:
    if frac < warmup:
        return peak * max(frac / warmup, 0.02)
    t = min((frac - warmup) / max(1 - warmup, 1e-9), 1.0)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------------------------------------
# Model.


def build_model(vocab_size: int, device: torch.device):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = dict(MODEL_CONFIG)
    theta = cfg.pop("rope_theta")
    # transformers 5 takes RoPE settings as rope_parameters; 4.x as rope_theta.
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        cfg["rope_theta"] = theta
    config = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=demo.TOKEN_ID[demo.BOS],
        eos_token_id=demo.TOKEN_ID[demo.EOS],
        pad_token_id=demo.TOKEN_ID[demo.PAD],
        **cfg,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(device)


def no_math_sdpa(device: torch.device):
    """On CUDA, forbid SDPA's math backend: at 8K tokens it would materialise the N x N scores
    and run out of memory or crawl; failing loudly is better."""
    if device.type != "cuda":
        import contextlib

        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
    return sdpa_kernel([getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)])


def weighted_loss(model, ids: torch.Tensor, weights: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss to optimise, plain mean next-token loss for logging)."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, use_cache=False).logits
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    w = weights[:, 1:].flatten()
    return (ce * w).sum() / w.sum(), ce.detach().mean()


# ---------------------------------------------------------------------------------------------
# Saving.


def save_model(model, out: Path, card: str, metrics: dict):
    """Write model (bf16), tokenizer, card and metrics into a fresh folder, then swap it in, so
    a crash never leaves a half-written package folder."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer = demo.build_demo_tokenizer()
    tokenizer.save_pretrained(tmp)

    # config.json: also write rope_theta at top level, which transformers 4.x reads (5.x reads
    # rope_parameters and accepts the extra key).
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_theta"] = MODEL_CONFIG["rope_theta"]
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # tokenizer_config.json: transformers 5 writes its own class name (TokenizersBackend);
    # PreTrainedTokenizerFast loads the same tokenizer.json under 4.x and 5.x.
    tc_path = tmp / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")

    (tmp / "README.md").write_text(card)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for f in tmp.iterdir():
        f.chmod(0o644)  # safetensors writes 0600; package data must be world-readable

    old = out.parent / f".{out.name}.old{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def write_card(args, info: dict, evals: list[dict], n_params: int) -> str:
    rows = "\n".join(
        f"| {e['n_tokens']} | {e['n_docs']} | {e['loss']:.3f} | {e['kv_first_acc']:.3f} | {e['kv_acc']:.3f} "
        f"| {e['copy_acc']:.3f} | "
        + ", ".join(f"{k}: {a:.2f} (n={n})" for k, (a, n) in e["kv_first_by_distance"].items())
        + " |"
        for e in evals
    )
    cfg = MODEL_CONFIG
    return f"""# pbs demo model

A tiny Llama-style causal LM trained from scratch on a synthetic corpus, shipped with `pbs` so
that `pbs analyze`, `pbs tune` and the tests run offline with no model argument. It is not a
language model of any real text.

- Architecture: `LlamaForCausalLM`, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']},
  {cfg['num_attention_heads']} query heads / {cfg['num_key_value_heads']} KV heads of dim {cfg['head_dim']}
  (grouped-query attention), MLP {cfg['intermediate_size']}, RoPE theta {cfg['rope_theta']:.0f},
  max positions {cfg['max_position_embeddings']}, tied embeddings; {n_params / 1e6:.2f} M parameters,
  stored in bfloat16.
- Tokenizer: word level, {len(demo.VOCAB)} tokens (one per whitespace-separated word of the corpus), BOS
  `<s>` prepended; `pbs_kernels.demo.build_demo_tokenizer()`.
- Corpus (`pbs_kernels.demo.demo_text(n_tokens, seed)`): sentences of a small grammar (agreement,
  recurring topic nouns) with, per 1000 tokens, about 8 records `put KEY VALUE ;`, 8 lookups
  `get KEY` whose VALUE must be found where the record was written (often thousands of tokens
  back), and a quoted span `quote ... unquote` or a `repeat` of an earlier span to be copied.

## How it was made

`{info['command']}`

- Device: {info['device']}; torch {info['torch']}, transformers {info['transformers']}; {info['date']}.
- {info['steps']} AdamW steps in {info['train_minutes']:.1f} min, {info['tokens'] / 1e6:.1f} M tokens
  ({info['tokens_per_s']:.0f} tokens/s), {info['batch_tokens']} tokens per step; peak learning rate
  {args.lr} with warmup and cosine decay over the time budget; sequence-length curriculum
  {info['phases']} (length: share of the time); loss weight {args.answer_weight} on tokens that need
  retrieval, 1 elsewhere; {info['precision']}, SDPA attention.
- Final training loss (plain next-token, last log window): {info['final_train_loss']:.3f}.

## Held-out results

Teacher-forced, on documents never trained on (`pbs_kernels.demo.demo_eval`). `kv_first`: the
first value token of a lookup (the retrieval itself); `kv`: all answer tokens; `copy`: tokens of
repeated spans after the first symbol. Lengths above the training length {args.seq_len} test RoPE
extrapolation.

| tokens | docs | loss | kv_first acc | kv acc | copy acc | kv_first acc by distance back |
|---|---|---|---|---|---|---|
{rows}
"""


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=6.0, help="training time budget (default 6)")
    p.add_argument("--out", type=Path, required=True, help="folder to write the model into (replaced)")
    p.add_argument("--seq-len", type=int, default=8192, help="longest training length (default 8192)")
    p.add_argument("--phases", default=None, help="curriculum LEN:SHARE,... (default L/8:.25,L/2:.35,L:.4)")
    p.add_argument("--batch-tokens", type=int, default=65536, help="tokens per optimizer step (default 65536)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=float, default=0.03, help="share of the budget for LR warmup")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--answer-weight", type=float, default=4.0, help="loss weight of retrieval tokens")
    p.add_argument("--eval-lens", default=None, help="held-out lengths, comma list (default L,2L)")
    p.add_argument("--eval-docs", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--workers", type=int, default=None, help="data processes (default: cores-2, <=8)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    p.add_argument("--log-seconds", type=float, default=15.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU is visible")
    cuda = device.type == "cuda"
    phases = parse_phases(args.phases, args.seq_len)
    eval_lens = [int(x) for x in args.eval_lens.split(",")] if args.eval_lens else [args.seq_len, 2 * args.seq_len]
    if max(eval_lens + [n for n, _ in phases]) > MODEL_CONFIG["max_position_embeddings"]:
        raise SystemExit(f"lengths must be <= {MODEL_CONFIG['max_position_embeddings']}")
    workers = args.workers if args.workers is not None else max(0, min(8, (os.cpu_count() or 1) - 2))
    budget = args.minutes * 60.0

    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dev_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    import transformers

    log(f"device {dev_name}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{workers} data workers, phases {phases}, budget {args.minutes} min")

    stream = BatchStream(workers, args.seed, depth=2 * workers + 2)
    model = build_model(len(demo.VOCAB), device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f} M parameters, vocab {len(demo.VOCAB)}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=cuda,
    )  # fmt: skip
    step_model = torch.compile(model) if (args.compile and cuda) else model
    kind_weight = torch.ones(4, device=device)
    kind_weight[[demo.KIND_KV_FIRST, demo.KIND_KV_REST, demo.KIND_COPY]] = args.answer_weight

    first_len = phase_at(phases, 0.0)
    stream.prime(first_len, max(args.batch_tokens // first_len, 1))

    step, tokens = 0, 0
    win_loss = torch.zeros((), device=device)
    win_steps, win_tokens = 0, 0
    final_train_loss = float("nan")
    cur_len = None
    t0 = time.perf_counter()
    win_t0 = last_probe = t0
    with no_math_sdpa(device):
        while True:
            elapsed = time.perf_counter() - t0
            frac = elapsed / budget
            if frac >= 1.0:
                break
            seq_len = phase_at(phases, frac)
            if seq_len != cur_len:
                log(f"phase: sequences of {seq_len} tokens, batch {max(args.batch_tokens // seq_len, 1)}")
                cur_len = seq_len
            batch = max(args.batch_tokens // seq_len, 1)
            ids16, kinds = stream.get(seq_len, batch)
            if cuda:
                ids16 = ids16.pin_memory().to(device, non_blocking=True)
                kinds = kinds.pin_memory().to(device, non_blocking=True)
            ids = ids16.long()
            weights = kind_weight[kinds.long()]
            lr = lr_at(frac, args.lr, args.warmup, 0.1)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, plain = weighted_loss(step_model, ids, weights, autocast=cuda)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            tokens += ids.numel()
            win_loss += plain
            win_steps += 1
            win_tokens += ids.numel()

            now = time.perf_counter()
            if now - win_t0 >= args.log_seconds:
                final_train_loss = (win_loss / win_steps).item()  # the only sync per window
                now = time.perf_counter()
                log(f"step {step:6d} len {ids.shape[1]:5d} loss {final_train_loss:.4f} lr {lr:.2e} "
                    f"{win_tokens / (now - win_t0):9.0f} tok/s  {(now - t0) / 60:.2f}/{args.minutes} min")
                win_loss.zero_()
                win_steps, win_tokens, win_t0 = 0, 0, now
            if now - last_probe >= max(60.0, 4 * args.log_seconds):
                last_probe = now
                # Enough documents of the current length for ~30 lookups, so the figure means something.
                probe = demo.demo_eval(model, n_tokens=min(seq_len, 4096), n_docs=max(1, 4096 // seq_len),
                                       seed=PROBE_SEED + step, autocast_dtype=torch.bfloat16 if cuda else None)  # fmt: skip
                log(f"probe @{probe.n_tokens}: kv_first_acc {probe.kv_first_acc:.3f} kv_acc {probe.kv_acc:.3f} "
                    f"copy_acc {probe.copy_acc:.3f} loss {probe.loss:.3f}")
                win_t0 = time.perf_counter()  # keep the probe out of the throughput figure
    if win_steps:
        final_train_loss = (win_loss / win_steps).item()
    train_s = time.perf_counter() - t0
    stream.close()
    tok_s = tokens / train_s
    log(f"trained {step} steps, {tokens / 1e6:.1f} M tokens in {train_s / 60:.2f} min ({tok_s:.0f} tok/s), "
        f"last train loss {final_train_loss:.4f}")
    if cuda:
        log(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")

    evals = []
    with no_math_sdpa(device):
        for n in eval_lens:
            t = time.perf_counter()
            e = demo.demo_eval(model, n_tokens=n, n_docs=args.eval_docs,
                               autocast_dtype=torch.bfloat16 if cuda else None)  # fmt: skip
            evals.append(e.as_dict())
            log(f"held-out @{n}: loss {e.loss:.4f} kv_first_acc {e.kv_first_acc:.3f} kv_acc {e.kv_acc:.3f} "
                f"copy_acc {e.copy_acc:.3f} mean distance {e.mean_distance:.0f} "
                f"by distance {e.as_dict()['kv_first_by_distance']} ({time.perf_counter() - t:.1f} s)")

    info = {
        "command": "python scripts/train_demo.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": dev_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": dt.date.today().isoformat(),
        "steps": step,
        "tokens": tokens,
        "train_minutes": train_s / 60,
        "tokens_per_s": tok_s,
        "batch_tokens": args.batch_tokens,
        "phases": ", ".join(f"{n}: {f:.2f}" for n, f in phases),
        "final_train_loss": final_train_loss,
        "precision": "bfloat16 autocast over float32 weights" if cuda else "float32",
    }
    metrics = {"train": info, "held_out": evals, "n_params": n_params,
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}  # fmt: skip
    save_model(model, args.out, write_card(args, info, evals, n_params), metrics)

    # Reload the real way, as users will, to prove the folder is complete.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.out)
    text = demo.demo_text(64, seed=7)
    assert tok(text)["input_ids"] == demo.demo_doc(64, 7).ids, "saved tokenizer does not encode the corpus"
    reloaded = AutoModelForCausalLM.from_pretrained(args.out)
    with torch.no_grad():
        reloaded(input_ids=torch.tensor([demo.demo_doc(64, 7).ids]))
    size = sum(f.stat().st_size for f in Path(args.out).iterdir())
    log(f"saved to {args.out} ({size / 2**20:.2f} MiB); reload check passed")

    parts = [f"train_loss={final_train_loss:.4f}", f"tokens_per_s={tok_s:.0f}", f"steps={step}"]
    for e in evals:
        n = e["n_tokens"]
        parts += [f"loss@{n}={e['loss']:.4f}", f"kv_first_acc@{n}={e['kv_first_acc']:.3f}",
                  f"kv_acc@{n}={e['kv_acc']:.3f}", f"copy_acc@{n}={e['copy_acc']:.3f}"]  # fmt: skip
    print("FINAL " + " ".join(parts), flush=True)


if __name__ == "__main__":
    main()

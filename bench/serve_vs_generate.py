"""The vLLM server against transformers `generate` on the same 64 prompts: wall time and tokens/s, as a ratio.

    python bench/serve_vs_generate.py [--n 64] [--new-tokens 64] [--batch-size 16] [--concurrency 64]

Both sides run the same base model + LoRA adapter (transformers with the adapter merged, its fastest
form), greedy, and generate exactly --new-tokens tokens per prompt (EOS ignored), so the work is equal.
vLLM is timed first; a temporary server is stopped before transformers runs so they never share the CPU.
Goal (issue 5): vLLM >= 5x faster.
"""

from __future__ import annotations

import argparse
import csv
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from _live import ROOT, base_model_dir, live_server, mirror


def prompts(n: int) -> list[str]:
    name = "loghub/BGL/BGL_2k.log_templates.csv"
    for path in (ROOT / "data/raw" / name, mirror() / name):
        if path.is_file():
            with path.open(encoding="utf-8") as handle:
                rows = [row["EventTemplate"] for row in csv.DictReader(handle)]
            return (rows * (n // len(rows) + 1))[:n]
    raise SystemExit("BGL_2k.log_templates.csv not found (data/raw or the mirror)")


def run_vllm(live: dict, logs: list[str], new_tokens: int, concurrency: int) -> float:
    from tasks.common.prompt import prompt_messages

    url = f"{live['url']}/chat/completions"

    def one(log: str) -> int:
        body = {"model": live["served_model"], "messages": prompt_messages(log, "bgl"), "temperature": 0.0,
                "max_tokens": new_tokens, "min_tokens": new_tokens, "ignore_eos": True}
        response = httpx.post(url, json=body, timeout=600)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    one(logs[0])  # warm-up: first request loads the LoRA weights
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        tokens = sum(pool.map(one, logs))
    elapsed = time.perf_counter() - started
    if tokens != len(logs) * new_tokens:
        raise SystemExit(f"vLLM generated {tokens} tokens, expected {len(logs) * new_tokens}")
    return elapsed


def run_transformers(base: str, adapter: str | None, logs: list[str], new_tokens: int, batch_size: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.common.prompt import prompt_messages

    tokenizer = AutoTokenizer.from_pretrained(base, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    texts = [tokenizer.apply_chat_template(prompt_messages(log, "bgl"), tokenize=False, add_generation_prompt=True)
             for log in logs]
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        if out.shape[1] - batch["input_ids"].shape[1] != new_tokens:
            raise SystemExit("transformers did not generate the requested number of tokens")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="transformers batch size")
    parser.add_argument("--concurrency", type=int, default=64, help="parallel requests to vLLM")
    parser.add_argument("--merged", action="store_true", help="serve merged weights instead of base + LoRA")
    parser.add_argument("--cpu-reserved", type=int, default=None, help="serve.cpu_reserved for the vLLM server")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()

    logs = prompts(args.n)
    overrides = {k: v for k, v in {"merged": args.merged or None, "cpu_reserved": args.cpu_reserved}.items()
                 if v is not None}
    with live_server(**overrides) as live:
        base, adapter = live.get("base") or str(base_model_dir()), live.get("adapter")
        vllm_s = run_vllm(live, logs, args.new_tokens, args.concurrency)
    tokens = args.n * args.new_tokens
    print(f"vLLM server       : {vllm_s:7.1f} s  {tokens / vllm_s:7.1f} tokens/s  "
          f"({args.n} prompts x {args.new_tokens} tokens, {args.concurrency} concurrent requests, "
          f"{'merged weights' if live.get('merged') else 'base + LoRA'})", flush=True)
    if args.skip_transformers:
        return
    hf_s = run_transformers(base, adapter, logs, args.new_tokens, args.batch_size)
    print(f"transformers      : {hf_s:7.1f} s  {tokens / hf_s:7.1f} tokens/s  "
          f"(batch {args.batch_size}, adapter merged, float32)", flush=True)
    ratio = hf_s / vllm_s
    print(f"vLLM / transformers: {ratio:.1f}x   (goal >= 5x) {'MET' if ratio >= 5 else 'NOT MET'}")


if __name__ == "__main__":
    main()

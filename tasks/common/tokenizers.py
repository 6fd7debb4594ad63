"""The special-token strings of a tokenizer, which tasks.prompt defangs in log text (issue 15, case 2).

A tokenizer turns the text of a special token (`<|im_end|>`, `<repo_name>`, `</s>`) into the control token
itself wherever it appears in a prompt, so a log line carrying one could close the user turn and open a
system turn. Training, evaluation and serving each know which tokenizer reads their prompts and pass its
special tokens to tasks.prompt.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

# tokenizer_config.json / special_tokens_map.json fields naming special tokens (transformers' SpecialTokensMixin)
NAMED_FIELDS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
LIST_FIELDS = ("additional_special_tokens", "extra_special_tokens")


def special_tokens_of(tokenizer: Any) -> tuple[str, ...]:
    """Every special-token string of a loaded transformers tokenizer, sorted.

    Its named special tokens (`all_special_tokens`) and every added token marked special
    (`added_tokens_decoder`), e.g. SmolLM2's `<|im_start|>`, `<|im_end|>`, `<repo_name>`, `<file_sep>`.
    """
    found = {str(t) for t in getattr(tokenizer, "all_special_tokens", None) or []}
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            found.add(str(added.content))
    return tuple(sorted(t for t in found if t))


def _content(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [str(value["content"])] if "content" in value else [t for v in value.values() for t in _content(v)]
    if isinstance(value, list):
        return [t for v in value for t in _content(v)]
    return []


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def special_tokens_in(folder: str | Path | None) -> tuple[str, ...]:
    """The special-token strings a tokenizer folder declares, read from its files (no transformers import).

    Sources: `tokenizer.json` added tokens marked special, `tokenizer_config.json` `added_tokens_decoder`
    entries marked special and its named/list fields, `special_tokens_map.json`. () when `folder` is None
    or holds none of these files (the caller then relies on the generic `<|...|>` rule of tasks.prompt).
    """
    if folder is None:
        return ()
    folder = Path(folder)
    found: set[str] = set()
    for added in _read_json(folder / "tokenizer.json").get("added_tokens") or []:
        if isinstance(added, dict) and added.get("special"):
            found.add(str(added.get("content", "")))
    config = _read_json(folder / "tokenizer_config.json")
    for added in (config.get("added_tokens_decoder") or {}).values():
        if isinstance(added, dict) and added.get("special"):
            found.add(str(added.get("content", "")))
    for source in (config, _read_json(folder / "special_tokens_map.json")):
        for name in (*NAMED_FIELDS, *LIST_FIELDS):
            found.update(_content(source.get(name)))
    return tuple(sorted(t for t in found if t))


# Tokens a chat template adds per message (role markers, separators; ChatML's `<|im_start|>role\n...<|im_end|>\n`
# is 5 with SmolLM2's tokenizer) and once for the generation prompt: counted generously, the prompt budget errs short.
CHAT_OVERHEAD_TOKENS = 8


@functools.lru_cache(maxsize=8)
def token_counter(folder: str | None) -> Callable[[str], int]:
    """A function giving the number of tokens of a text under the tokenizer in `folder` (its `tokenizer.json`, read
    with the `tokenizers` library: no transformers import, ~10 ms).

    Without a readable `tokenizer.json` (None, a remote endpoint whose tokenizer is not here) it counts UTF-8
    bytes: an upper bound for byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2) and byte-fallback tokenizers, whose
    every token covers at least one byte, so a prompt fitted to it is never too long (issue 21, case 7).
    """
    if folder is not None and (Path(folder) / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        except Exception:  # an unreadable tokenizer falls back to the byte bound below
            tokenizer = None
        if tokenizer is not None:
            return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)
    return lambda text: len(text.encode("utf-8"))


def chat_tokens(messages: list[dict[str, str]], count: Callable[[str], int]) -> int:
    """Tokens of a chat prompt: its messages' contents under `count`, plus CHAT_OVERHEAD_TOKENS per message and once
    for the opened assistant turn."""
    return sum(count(m.get("content") or "") + CHAT_OVERHEAD_TOKENS for m in messages) + CHAT_OVERHEAD_TOKENS

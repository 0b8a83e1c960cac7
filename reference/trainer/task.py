"""The embedded synthetic task, its character tokenizer, and prompt sets read from JSONL.

The embedded task is string reversal: the prompt ``"<bos>cabd>"`` asks for ``"dbac<eos>"``. Its answer is
checkable exactly, a tiny transformer learns it in a minute on a CPU, and a smaller one learns it badly, which
leaves room for distillation to help.

The character tokenizer also holds a few whole-word tokens (``" wait"``, ``" but"``, ``" maybe"``) that the
task never uses: they are the hedging tokens whose frequency the collapse diagnostics watch. The task's
alphabet cannot spell them, so they only appear if a model puts probability mass on them.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
DEFAULT_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 >:=+-.,?"
DEFAULT_WORDS = (" wait", " but", " maybe")


class CharTokenizer:
    """Character-level tokenizer with three special tokens and a few whole-word tokens.

    ``encode`` matches the longest word token first, then single characters; unknown characters raise.
    Ids: 0 = pad, 1 = bos, 2 = eos, then the characters, then the words.
    """

    def __init__(self, chars: str = DEFAULT_CHARS, words: Sequence[str] = DEFAULT_WORDS):
        if len(set(chars)) != len(chars):
            raise ValueError("chars must not repeat")
        self.chars, self.words = chars, tuple(words)
        self.itos = [PAD, BOS, EOS] + list(chars) + list(self.words)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self._by_length = sorted(self.words, key=len, reverse=True)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @property
    def special_ids(self) -> list[int]:
        return [self.pad_token_id, self.bos_token_id, self.eos_token_id]

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [self.bos_token_id] if add_bos else []
        i = 0
        while i < len(text):
            for w in self._by_length:
                if text.startswith(w, i):
                    ids.append(self.stoi[w])
                    i += len(w)
                    break
            else:
                if text[i] not in self.stoi:
                    raise ValueError(f"character {text[i]!r} is not in the tokenizer's alphabet")
                ids.append(self.stoi[text[i]])
                i += 1
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in (self.pad_token_id, self.bos_token_id, self.eos_token_id):
                continue
            out.append(self.itos[i])
        return "".join(out)

    def token_ids(self, words: Sequence[str]) -> list[int]:
        """Ids of the given whole-word tokens (unknown words are skipped)."""
        return [self.stoi[w] for w in words if w in self.stoi]

    def save(self, path: str) -> None:
        with open(os.path.join(path, "char_tokenizer.json"), "w") as f:
            json.dump({"chars": self.chars, "words": list(self.words)}, f)

    @classmethod
    def load(cls, path: str) -> "CharTokenizer":
        with open(os.path.join(path, "char_tokenizer.json")) as f:
            d = json.load(f)
        return cls(d["chars"], d["words"])


@dataclass
class Example:
    """One prompt (token ids, including any bos), its reference answer if known, its privileged context."""
    prompt: list[int]
    answer: Optional[str] = None
    context: list[int] = field(default_factory=list)


class ReverseTask:
    """Reverse a random lowercase string: prompt ``<bos>{s}>``, answer ``reversed(s)`` then ``<eos>``."""

    name = "reverse"

    def __init__(self, tokenizer: CharTokenizer, min_len: int = 3, max_len: int = 8, alphabet: str = "abcdefghijklmnop"):
        self.tok, self.min_len, self.max_len, self.alphabet = tokenizer, min_len, max_len, alphabet

    @property
    def max_new_tokens(self) -> int:
        return self.max_len + 4

    def sample(self, rng: random.Random) -> tuple[str, str]:
        n = rng.randint(self.min_len, self.max_len)
        s = "".join(rng.choice(self.alphabet) for _ in range(n))
        return s + ">", s[::-1]

    def examples(self, n: int, seed: int, context: str = "") -> list[Example]:
        rng = random.Random(seed)
        ctx = self.tok.encode(context) if context else []
        out = []
        for _ in range(n):
            prompt, answer = self.sample(rng)
            out.append(Example(self.tok.encode(prompt, add_bos=True), answer, ctx))
        return out

    def answer_ids(self, answer: str) -> list[int]:
        return self.tok.encode(answer) + [self.tok.eos_token_id]


class RuleTask(ReverseTask):
    """The OPSD task (claim c of ``python -m reference.replicate``): one of several string transformations.

    Every prompt is ``<bos>{s}>``; the target answer applies the task's ``target`` rule (default ``reverse``).
    The rules are ``reverse``, ``copy`` and ``shift`` (every letter to the next one of the alphabet, cyclic).
    Two kinds of privileged context can be shown to the self-teacher, both before the prompt:

    * the shared rule, ``"{rule}: "`` -- the same system prompt for every example (``rule_context``);
    * an instance-specific hint, ``"hint {answer}: "`` -- the answer itself (``hint_context``).

    ``warmup_examples`` is the SFT mixture that makes both usable: a third each of rule-prompted examples
    (random rule, the answer follows the stated rule), hinted examples (random rule, the answer copies the hint)
    and bare prompts whose answer follows a random rule -- so without context the model does not know which rule
    is asked (about 1/3 accuracy on the target), and with either context it does.
    """

    name = "rules"
    RULES = ("reverse", "copy", "shift")

    def __init__(self, tokenizer: CharTokenizer, target: str = "reverse", min_len: int = 3, max_len: int = 8,
                 alphabet: str = "abcdefghijklmnop"):
        super().__init__(tokenizer, min_len, max_len, alphabet)
        if target not in self.RULES:
            raise ValueError(f"target must be one of {self.RULES}, got {target!r}")
        self.target = target

    def apply(self, s: str, rule: str) -> str:
        if rule == "reverse":
            return s[::-1]
        if rule == "copy":
            return s
        if rule == "shift":
            a = self.alphabet
            return "".join(a[(a.index(c) + 1) % len(a)] for c in s)
        raise ValueError(f"unknown rule {rule!r}")

    def sample(self, rng: random.Random, rule: Optional[str] = None) -> tuple[str, str]:
        n = rng.randint(self.min_len, self.max_len)
        s = "".join(rng.choice(self.alphabet) for _ in range(n))
        return s + ">", self.apply(s, rule or self.target)

    def rule_context(self, rule: Optional[str] = None) -> list[int]:
        return self.tok.encode(f"{rule or self.target}: ")

    def hint_context(self, answer: str) -> list[int]:
        return self.tok.encode(f"hint {answer}: ")

    def warmup_examples(self, n: int, seed: int) -> list[Example]:
        rng = random.Random(seed)
        out = []
        for i in range(n):
            rule = rng.choice(self.RULES)
            prompt, answer = self.sample(rng, rule)
            kind = i % 3
            ctx = self.rule_context(rule) if kind == 0 else self.hint_context(answer) if kind == 1 else []
            out.append(Example(self.tok.encode(prompt, add_bos=True), answer, ctx))
        return out


def check_answer(response_text: str, answer: Optional[str]) -> Optional[bool]:
    """Exact match after stripping whitespace; None when there is no reference answer."""
    if answer is None:
        return None
    return response_text.strip() == answer.strip()


def load_jsonl_prompts(path: str, tokenizer, add_bos: bool = True) -> list[Example]:
    """Read ``{"prompt": str, "answer": str (optional), "context": str (optional)}`` per line.

    ``context`` is the privileged context that only the teacher sees in self-distillation (OPSD); it goes
    before the prompt. Lines that are blank are skipped.
    """
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(d, dict) or not isinstance(d.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: each line needs a string field 'prompt'")
            out.append(Example(_encode(tokenizer, d["prompt"], add_bos), d.get("answer"),
                               _encode(tokenizer, d["context"], False) if d.get("context") else []))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def _encode(tokenizer, text: str, add_bos: bool) -> list[int]:
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.encode(text, add_bos=add_bos)
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is not None:
        ids = [bos] + ids
    return ids

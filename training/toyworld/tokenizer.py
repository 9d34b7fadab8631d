"""A real CLIPTokenizer built from the BPE vocabulary that open-clip-torch ships.

No hub download: the vocabulary file comes from the installed package (found with
``importlib.util.find_spec`` so that ``open_clip`` itself, which needs torchvision, is
never imported). The token ids equal OpenAI CLIP's, as open_clip's SimpleTokenizer builds them.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from transformers import CLIPTokenizer

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def find_bpe_vocab() -> Path:
    """Path of open-clip-torch's shipped BPE file; tells the user how to install it if absent."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "open-clip-torch is not installed; install it with "
            "`pip install --no-deps open-clip-torch` (only its BPE vocabulary is used)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / VOCAB_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the open-clip-torch install")
    return path


def build_clip_tokenizer(out_dir: Path, model_max_length: int = 32) -> CLIPTokenizer:
    """Write vocab.json + merges.txt to ``out_dir`` and return the CLIPTokenizer loaded from it."""
    with gzip.open(find_bpe_vocab()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out_dir / stale).unlink(missing_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    with open(out_dir / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(" ".join(m) + "\n" for m in merges)
    # from_pretrained reads vocab.json + merges.txt the same way on transformers 4 and 5.
    tok = CLIPTokenizer.from_pretrained(out_dir, model_max_length=model_max_length)
    tok.save_pretrained(out_dir)
    return tok

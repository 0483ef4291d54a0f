"""Shared fixtures: tiny random models of every supported architecture, built from configs (no download)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WIKITEXT = SHARED / "data/text/wikitext-2-raw-v1/wiki.test.raw"
PTB = SHARED / "data/text/ptb/ptb.valid.txt"

VOCAB = 96

# Under pytest-xdist (the default run, pyproject.toml) every worker gets an equal share of the cores for
# torch's thread team, on which the packed kernels run too: workers x threads never exceeds the cores.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_share)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(_share))

if any(Path(p or ".").resolve() == ROOT for p in sys.path):
    pytest.exit("the checkout is on sys.path (python -m pytest from it, or PYTHONPATH), where its kernels/ folder "
                "shadows Hugging Face's `kernels`: run the tests with the pytest script (make test)", returncode=4)


def tiny_config(arch: str):
    """A 2-block config of each architecture the tests cover, small enough to run in milliseconds."""
    import transformers as tf

    common = dict(vocab_size=VOCAB)
    # llama-style keyword names (hidden_size, intermediate_size, num_hidden_layers, ...)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch in LLAMA_LIKE:
        extra = {"gemma": dict(head_dim=8), "gemma3_text": dict(head_dim=8, sliding_window=16),
                 "qwen3": dict(head_dim=8), "stablelm": dict(num_key_value_heads=4),
                 "phi3": dict(pad_token_id=0)}.get(arch, {})
        return tf.AutoConfig.for_model(arch, **dict(llama_like, **extra))
    if arch == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=128, word_embed_proj_dim=32, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    if arch == "gpt_bigcode":
        return tf.GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=4, n_positions=128, multi_query=True, **common)
    if arch == "gptj":
        return tf.GPTJConfig(n_embd=32, n_layer=2, n_head=4, n_positions=128, rotary_dim=4, **common)
    if arch == "bloom":
        return tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common)
    if arch == "falcon":  # falcon-7b layout: parallel attention, multi-query
        return tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                               **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=128, **common)
    if arch == "mixtral":  # fused 3-D experts (transformers 5 layout)
        return tf.MixtralConfig(**dict(llama_like, intermediate_size=32), num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**dict(llama_like, head_dim=8), moe_intermediate_size=16, num_experts=4,
                                 num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
    raise KeyError(arch)


LLAMA_LIKE = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3", "granite", "cohere", "starcoder2",
              "stablelm"]
ARCHS = ["llama", "mistral", "qwen2", "gemma", "opt", "gpt2", "gpt_neox"]  # the zoo's and first-tested families
# every architecture the generic adapter is tested on (issue: at least 15, with two MoE)
ALL_ARCHS = ARCHS + ["qwen3", "gemma3_text", "phi3", "granite", "cohere", "starcoder2", "stablelm", "falcon", "bloom",
                     "gpt_bigcode", "gptj", "mixtral", "qwen3_moe"]


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A small byte-level tokenizer trained on the PTB text, as a transformers tokenizer.

    Its 97 tokens are ``<eos>``, the printable ASCII bytes, and the text's space and newline: no room is left
    for merges. The alphabet is sorted before it is cut: ``ByteLevel.alphabet()`` comes from a hash set whose
    order changes with every process, and a random cut made the tiny models (and every figure measured on
    them) differ between runs and machines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[:VOCAB - 2],
                                  special_tokens=["<eos>"])
    text = PTB.read_text()[:20000] if PTB.exists() else "hello world " * 500
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="session")
def tiny_bos_tokenizer(tiny_tokenizer):
    """The tiny tokenizer with a ``<bos>`` token that its encodings start with (``TemplateProcessing``), as
    Llama-style tokenizers with ``add_bos_token`` do; id ``len(tiny_tokenizer)``, so a model needs one more row."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    tok.add_special_tokens(["<bos>"])
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")


@pytest.fixture(scope="session")
def tiny_bos_folder(tmp_path_factory, tiny_bos_tokenizer):
    """A saved tiny random llama whose tokenizer adds BOS."""
    folder = tmp_path_factory.mktemp("tiny-llama-bos")
    model = tiny_model("llama")
    model.config.bos_token_id = tiny_bos_tokenizer.bos_token_id
    model.resize_token_embeddings(len(tiny_bos_tokenizer))
    model.config.vocab_size = len(tiny_bos_tokenizer)
    model.save_pretrained(folder)
    tiny_bos_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_tokenizer):
    """A saved Hugging Face folder (safetensors + tokenizer) of a tiny random llama."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.config.vocab_size = len(tiny_tokenizer)
    model.resize_token_embeddings(len(tiny_tokenizer))
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny models and per-column loops are all per-op overhead, and on a
    shared 2-core machine more threads only add OpenMP waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory):
    """Tests never write into the user's ADVISOR_HOME; hub access is off."""
    os.environ["ADVISOR_HOME"] = str(tmp_path_factory.mktemp("advisor-home"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    # plan/recommend do not time the kernels in tests (speeds are labelled estimates);
    # tests/test_kernel_speed.py runs the calibration itself
    os.environ.setdefault("ADVISOR_KERNEL_CALIBRATION", "0")
    os.environ["HF_DATASETS_OFFLINE"] = "1"

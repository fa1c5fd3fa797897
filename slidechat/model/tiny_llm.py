"""Tiny random causal LMs + tokenizers built offline, for tests and smoke runs without a model hub.

``arch="qwen2"`` (the default, used by the demo and most tests) writes the folder it always wrote: a
``Qwen2ForCausalLM`` with Qwen2.5's three ChatML special tokens and a ChatML template without Qwen2.5's
default system prompt. ``official_template=True`` gives it Qwen2.5-Instruct's own template instead.
``arch="qwen3"`` and ``arch="llama"`` write a ``Qwen3ForCausalLM`` / ``LlamaForCausalLM`` whose tokenizer
carries that family's real chat template (:mod:`slidechat.model.llm_templates`) and special tokens, so
the prompt engine is tested against the rule the real tokenizers apply. Every folder loads with
``AutoModelForCausalLM`` / ``AutoTokenizer`` exactly like a real one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from slidechat.model.llm_templates import LLAMA_3_1_INSTRUCT, QWEN2_5_INSTRUCT, QWEN3

logger = logging.getLogger(__name__)

# Qwen2.5-Instruct's special tokens (ids are assigned after the BPE vocabulary here).
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

# Qwen2.5's ChatML layout without its default system prompt: SlideChat sends no system message unless the
# conversation has one.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2's pre-tokenisation regex (splits words, numbers digit by digit, punctuation, whitespace).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

_CORPUS = """
The whole slide image shows invasive ductal carcinoma of the breast with a solid and tubular growth pattern.
Tumor cells have enlarged pleomorphic nuclei, prominent nucleoli and frequent mitotic figures.
The stroma is desmoplastic with scattered lymphocytes and plasma cells. Necrosis is present in the center.
There is no evidence of lymphovascular invasion. The surgical margins are free of tumor.
This slide shows lung adenocarcinoma with acinar and papillary patterns and focal mucin production.
The tissue contains glands lined by atypical columnar cells with hyperchromatic nuclei.
The tumor infiltrates the surrounding fibrous tissue and shows perineural invasion.
Squamous cell carcinoma with keratin pearls, intercellular bridges and abundant eosinophilic cytoplasm.
The epithelium shows high grade dysplasia. The basement membrane is intact in some areas.
Clear cell renal cell carcinoma composed of nests of cells with clear cytoplasm and a delicate vascular network.
The nuclei are round with small nucleoli, consistent with a low nuclear grade.
Hepatocellular carcinoma with trabecular architecture, bile production and vascular invasion.
Colon adenocarcinoma with cribriform glands, dirty necrosis and invasion into the muscularis propria.
Glioblastoma with marked cellularity, microvascular proliferation and pseudopalisading necrosis.
Papillary thyroid carcinoma with nuclear grooves, pseudoinclusions and psammoma bodies.
Melanoma with sheets of epithelioid cells containing melanin pigment and prominent red nucleoli.
The lymph node shows metastatic carcinoma in the subcapsular sinus.
Normal tissue adjacent to the tumor shows benign ducts and lobules without atypia.
Inflammation is mild. Fibrosis is moderate. The tumor is well differentiated, moderately differentiated,
or poorly differentiated depending on the gland formation and the nuclear pleomorphism.
Question: What is the most likely diagnosis? Answer: The most likely diagnosis is carcinoma.
Question: Which histological feature is present in this slide? A. necrosis B. calcification C. fibrosis
D. hemorrhage. Answer: A. The image shows areas of necrosis with cellular debris.
Please describe the slide in detail. Can you identify the tumor type? Is there any invasion?
What grade is the tumor? Where is the lesion located? How many mitoses are seen per high power field?
The patient is a woman of sixty years with a mass in the left breast. The specimen is a biopsy.
Immunohistochemistry shows positive staining for estrogen receptor and progesterone receptor.
The cells are negative for HER2. Ki-67 proliferation index is high. The stage is pT2 N1 M0.
Yes. No. It is likely. It is unlikely. The answer is B. The answer is C. The answer is D.
one two three four five six seven eight nine ten hundred thousand percent cells per field area
a an the of in on at with without by for from to and or but is are was were be been has have had
this that these those it its they their there here which what who where when why how not no yes
"""


# Qwen3's special tokens after <|endoftext|>, <|im_start|>, <|im_end|> (tokenizer_config.json of Qwen3-4B as
# quoted in github.com/akougkas/warpio-cli warpio-docs/ai-docs/model_cards/qwen3:4b.md): 14 special tokens,
# then 12 plain added ones (<think>/</think> last); ids follow in this order after the BPE vocabulary.
QWEN3_SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, "<|object_ref_start|>", "<|object_ref_end|>",
                        "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                        "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN3_ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                      "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
                      "<think>", "</think>"]

# Llama 3.1's first special tokens (ids 128000-128010 in the real vocabulary; the reserved ones after them
# are left out). The chat template uses begin_of_text (bos), start/end_header_id, eot_id, eom_id, python_tag.
BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
EOT_ID = "<|eot_id|>"
EOM_ID = "<|eom_id|>"
LLAMA3_SPECIAL_TOKENS = [BEGIN_OF_TEXT, END_OF_TEXT, "<|reserved_special_token_0|>",
                         "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                         "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>", EOM_ID,
                         EOT_ID, "<|python_tag|>"]
# Llama 3's pre-tokenisation regex: Qwen2's with numbers in groups of up to three digits.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

#: ``make_tiny_llm(arch=...)`` choices
ARCHS = ("qwen2", "qwen3", "llama")


def _train_bpe(corpus: str, vocab_size: int, split_regex: str) -> Any:
    """Byte-level BPE (``tokenizers.Tokenizer``) trained on ``corpus`` with the family's split regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    lines = [ln for ln in corpus.strip().splitlines() if ln.strip()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    return tok


def _add_tokens(tok: Any, special: Sequence[str], plain: Sequence[str] = ()) -> None:
    """Special tokens, then plain added tokens (matched whole, not skipped when decoding), in order."""
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])


def _build_tokenizer(vocab_size: int = 3000, special_tokens=None, additional_special_tokens=None,
                     corpus: str = _CORPUS, chat_template: str = CHAT_TEMPLATE,
                     plain_added_tokens: Sequence[str] = ()):
    """Byte-level BPE tokenizer trained on ``corpus``; special tokens get ids after the BPE vocabulary
    in the order given (default: Qwen2.5's three), then ``plain_added_tokens``. Also used by
    ``tiny_qwen2vl`` with Qwen2-VL's tokens."""
    from transformers import Qwen2TokenizerFast

    tok = _train_bpe(corpus, vocab_size, _QWEN2_SPLIT)
    special_tokens = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
    if additional_special_tokens is None:
        additional_special_tokens = [IM_START, IM_END]
    # Special tokens go after the BPE vocabulary in Qwen's order: <|endoftext|>, <|im_start|>, <|im_end|>.
    tok.add_special_tokens(special_tokens)
    if plain_added_tokens:
        _add_tokens(tok, (), plain_added_tokens)
    hf_tok = Qwen2TokenizerFast(
        tokenizer_object=tok,
        unk_token=None,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=list(additional_special_tokens),
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
        errors="replace",
        split_special_tokens=False,
    )
    hf_tok.chat_template = chat_template
    return hf_tok


def _build_llama3_tokenizer(vocab_size: int = 3000, corpus: str = _CORPUS) -> Any:
    """Llama-3.1-Instruct-style tokenizer: byte-level BPE with Llama 3's split regex, its special tokens,
    ``<|begin_of_text|>`` added in front by ``add_special_tokens=True`` (as the real post-processor does;
    the chat template writes it itself), eos ``<|eot_id|>``, no pad token, Meta's chat template."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(corpus, vocab_size, _LLAMA3_SPLIT)
    _add_tokens(tok, LLAMA3_SPECIAL_TOKENS)
    bos_id = tok.token_to_id(BEGIN_OF_TEXT)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BEGIN_OF_TEXT}:0 $A:0", pair=f"{BEGIN_OF_TEXT}:0 $A:0 {BEGIN_OF_TEXT}:1 $B:1",
        special_tokens=[(BEGIN_OF_TEXT, bos_id)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BEGIN_OF_TEXT, eos_token=EOT_ID,
                                     clean_up_tokenization_spaces=False, model_max_length=131072)
    hf_tok.chat_template = LLAMA_3_1_INSTRUCT
    return hf_tok


def build_tiny_tokenizer(arch: str = "qwen2", official_template: Optional[bool] = None) -> Any:
    """The tokenizer ``make_tiny_llm`` writes for ``arch`` (see the module doc)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r} (known: {', '.join(ARCHS)})")
    if official_template is False and arch != "qwen2":
        raise ValueError(f"arch {arch!r} always carries its own chat template (official_template=False "
                         f"is for the legacy qwen2 folder)")
    if arch == "qwen2":
        return _build_tokenizer(chat_template=QWEN2_5_INSTRUCT if official_template else CHAT_TEMPLATE)
    if arch == "qwen3":
        return _build_tokenizer(special_tokens=QWEN3_SPECIAL_TOKENS,
                                additional_special_tokens=QWEN3_SPECIAL_TOKENS[1:],
                                plain_added_tokens=QWEN3_ADDED_TOKENS, chat_template=QWEN3)
    return _build_llama3_tokenizer()


def make_tiny_llm(out_dir: Union[str, os.PathLike], hidden_size: int = 64, num_layers: int = 2,
                  num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                  seed: int = 0, arch: str = "qwen2", official_template: Optional[bool] = None) -> Path:
    """Write a tiny random causal LM of ``arch`` (qwen2, qwen3, llama) and its tokenizer to ``out_dir``;
    returns the folder. ``official_template`` (qwen2 only): Qwen2.5-Instruct's own chat template instead
    of the legacy one."""
    import torch
    from transformers import GenerationConfig

    out = Path(out_dir)
    tokenizer = build_tiny_tokenizer(arch, official_template)
    out.mkdir(parents=True, exist_ok=True)
    vocab = len(tokenizer)
    common: Dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="float32")
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        bos_id = tokenizer.convert_tokens_to_ids(BEGIN_OF_TEXT)
        eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in (END_OF_TEXT, EOM_ID, EOT_ID)]
        config = LlamaConfig(**common, max_position_embeddings=131072, rope_theta=500000.0,
                             bos_token_id=bos_id, eos_token_id=eos_ids)
        model_cls = LlamaForCausalLM
        gen = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_ids, do_sample=False)
    else:
        pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
        im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
        ids = dict(bos_token_id=pad_id, eos_token_id=im_end_id, pad_token_id=pad_id)
        if arch == "qwen3":
            from transformers import Qwen3Config, Qwen3ForCausalLM

            # Qwen3's head_dim is its own setting (128 in the real configs), not hidden // heads
            config = Qwen3Config(**common, **ids, head_dim=hidden_size // num_heads,
                                 max_position_embeddings=40960, rope_theta=1000000.0,
                                 use_sliding_window=False)
            model_cls = Qwen3ForCausalLM
        else:
            from transformers import Qwen2Config, Qwen2ForCausalLM

            config = Qwen2Config(**common, **ids, max_position_embeddings=32768, rope_theta=1000000.0,
                                 use_sliding_window=False)
            model_cls = Qwen2ForCausalLM
        gen = GenerationConfig(bos_token_id=pad_id, eos_token_id=[im_end_id, pad_id], pad_token_id=pad_id,
                               do_sample=False)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config = gen
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    logger.info("tiny %s LLM (hidden %d, vocab %d) written to %s", arch, hidden_size, vocab, out)
    return out

"""A tiny random Qwen2 causal LM + tokenizer built offline, for tests and smoke runs without a model hub.

The folder it writes loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` exactly like a real
Qwen2.5-Instruct folder (same model class, ChatML special tokens and template), so every code path that
later runs on Qwen2.5-7B can be exercised on a laptop in seconds.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Union

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


def _build_tokenizer(vocab_size: int = 3000, special_tokens=None, additional_special_tokens=None,
                     corpus: str = _CORPUS, chat_template: str = CHAT_TEMPLATE):
    """Byte-level BPE tokenizer trained on ``corpus``; special tokens get ids after the BPE vocabulary
    in the order given (default: Qwen2.5's three). Also used by ``tiny_qwen2vl`` with Qwen2-VL's tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    special_tokens = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
    if additional_special_tokens is None:
        additional_special_tokens = [IM_START, IM_END]
    lines = [ln for ln in corpus.strip().splitlines() if ln.strip()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    # Special tokens go after the BPE vocabulary in Qwen's order: <|endoftext|>, <|im_start|>, <|im_end|>.
    tok.add_special_tokens(special_tokens)
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


def make_tiny_llm(out_dir: Union[str, os.PathLike], hidden_size: int = 64, num_layers: int = 2,
                  num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                  seed: int = 0) -> Path:
    """Write a tiny random ``Qwen2ForCausalLM`` and its tokenizer to ``out_dir``; returns the folder."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    vocab = len(tokenizer)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=pad_id,
        eos_token_id=im_end_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
        use_sliding_window=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=[im_end_id, pad_id], pad_token_id=pad_id, do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    logger.info("tiny Qwen2 LLM (hidden %d, vocab %d) written to %s", hidden_size, vocab, out)
    return out

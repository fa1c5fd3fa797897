"""SlideChat: patch features -> LongNet slide encoder -> projector -> any Hugging Face causal LM.

Attribute names (``llm``, ``LongNet_encoder``, ``projector``) give ``state_dict()`` the released
checkpoint's key names, so one loader serves released weights and ours. The slide contributes one visual
token per patch, spliced in at the single ``IMAGE_TOKEN_INDEX`` placeholder of each prompt.

Features of another width than the LongNet encoder's (1,536-d UNI2-h or H-optimus, 2,560-d Virchow2) go
through ``input_proj``, a Linear ``feature_dim -> embed_dim`` in front of the encoder, as Prov-GigaPath's
slide encoder takes its 1,536-d tile features (``PatchEmbed``: ``nn.Linear(in_chans=1536, embed_dim)``,
https://github.com/prov-gigapath/prov-gigapath/blob/main/gigapath/slide_encoder.py). When the widths are
equal (the released SlideChat, CONCH's 512) ``input_proj`` is an identity with no parameters: the
released key names and the strict key check are unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from slidechat.model.checkpoint import (EXPORTED_CONFIG_FILE, EXPORTED_WEIGHTS_FILE, KeyReport, load_checked,
                                        load_weights)
from slidechat.model.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from slidechat.model.hf_folder import load_model, load_tokenizer as hf_load_tokenizer
from slidechat.model.label_logits import causal_lm_parts, loss_at_labels
from slidechat.model.prefix_cache import (PrefixCache, common_prefix_len, crop_cache, generate_from_prefix,
                                          middle_padded, prefill, shared_len)
from slidechat.model.projector import Projector
from slidechat.model.slide_encoder import LongNetEncoder, SlideEncoderConfig, saved_encoder_dict
from slidechat.utils.errors import SlideChatError
from slidechat.utils.outputs import check_output_folder, staged_folder
from slidechat.utils.paths import PathLike

logger = logging.getLogger(__name__)

SLIDE_MODULES_FILE = EXPORTED_WEIGHTS_FILE
CONFIG_FILE = EXPORTED_CONFIG_FILE
LLM_DIR = "llm"
#: the slide modules' key prefixes (``input_proj.`` only exists when feature_dim != the encoder's embed_dim)
SLIDE_PREFIXES = ("input_proj.", "LongNet_encoder.", "projector.")
#: the core's children (``engine.train_model`` registers them on its wrapper)
CORE_CHILDREN = ("llm", "input_proj", "LongNet_encoder", "projector")
# parameters our encoder may add on top of the released layout: absent from released checkpoints by design
OPTIONAL_SLIDE_KEYS = ("LongNet_encoder.coord_pos_embed.",)
FORMAT_VERSION = 1
#: ``utils.outputs`` kind of an exported SlideChat folder
EXPORT_KIND = "SlideChat model export"


def legacy_export_entries(folder: Path) -> Optional[set]:
    """The entries an export written before the output marker holds (``None``: not such an export)."""
    if (folder / CONFIG_FILE).is_file() and (folder / LLM_DIR).is_dir():
        return {CONFIG_FILE, LLM_DIR, SLIDE_MODULES_FILE}
    return None


@dataclass
class SlideChatConfig:
    """Slide modules' sizes plus the prompt format the model was trained with.

    ``prompt_template``/``chat_template_kwargs`` travel with the model (training config -> checkpoint
    config -> export ``config.json``) so ``slidechat test``, ``xtuner test`` and ``slidechat chat`` prompt
    it as it was trained. A folder written before these keys existed was trained with ``qwen_chat``. The
    names are resolved and checked by the data layer (``slidechat.data.template.config_template``) where a
    model is built or loaded: a model takes token ids and does not know prompt formats.
    """

    feature_dim: int = 512
    encoder: SlideEncoderConfig = field(default_factory=SlideEncoderConfig)
    max_patches_train: int = 10240
    max_patches_test: int = 38400
    prompt_template: str = "qwen_chat"
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):  # configs written as plain dicts (xtuner/mmengine, JSON)
            self.encoder = SlideEncoderConfig.from_dict(self.encoder)
        self.chat_template_kwargs = dict(self.chat_template_kwargs or {})

    def to_dict(self) -> Dict[str, Any]:
        return {"feature_dim": self.feature_dim, "encoder": self.encoder.to_dict(),
                "max_patches_train": self.max_patches_train, "max_patches_test": self.max_patches_test,
                "prompt_template": self.prompt_template,
                "chat_template_kwargs": dict(self.chat_template_kwargs)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SlideChatConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def input_projection(feature_dim: int, embed_dim: int) -> nn.Module:
    """``feature_dim -> embed_dim`` in front of the slide encoder: a Linear when the widths differ
    (initialised as Prov-GigaPath's ``patch_embed.proj``: xavier-uniform weight, zero bias;
    gigapath/slide_encoder.py ``initialize_vit_weights`` / ``_init_weights``), else an identity without
    parameters, so 512-d CONCH features keep the released model's exact layout."""
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
        raise SlideChatError(f"feature_dim must be a positive integer (the patch features' width), got "
                             f"{feature_dim!r}", hint="set feature_dim = N in the config (see docs/training.md)")
    if feature_dim == embed_dim:
        return nn.Identity()
    proj = nn.Linear(feature_dim, embed_dim)
    nn.init.xavier_uniform_(proj.weight)
    nn.init.zeros_(proj.bias)
    return proj


#: the report of every SlideChat load (former name; one report format: ``checkpoint.KeyReport``)
LoadReport = KeyReport


def _canonical_llm_key(key: str) -> str:
    """Released-style name of an LLM parameter whether or not the LLM is wrapped by peft."""
    if key.startswith("llm.base_model.model."):
        key = "llm." + key[len("llm.base_model.model."):]
    return key.replace(".base_layer.", ".")


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


class SlideChatModel(nn.Module):
    def __init__(self, llm: nn.Module, config: Optional[SlideChatConfig] = None, tokenizer: Any = None):
        super().__init__()
        config = config or SlideChatConfig()
        if isinstance(config, dict):
            config = SlideChatConfig.from_dict(config)
        self.config = config
        self.llm = llm
        self.input_proj = input_projection(config.feature_dim, config.encoder.embed_dim)
        self.LongNet_encoder = LongNetEncoder(config.encoder)
        self.projector = Projector(config.encoder.embed_dim, self._llm_hidden_size())
        self.tokenizer = tokenizer  # optional, for default stop tokens and save_pretrained

    # ---------------------------------------------------------------------------------------------------
    # helpers

    def _llm_hidden_size(self) -> int:
        cfg = getattr(self.llm, "config", None)
        hidden = getattr(cfg, "hidden_size", None)
        if hidden is None:
            hidden = self.llm.get_input_embeddings().weight.shape[1]
        return int(hidden)

    def _embed_tokens(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def _llm_dtype_device(self):
        w = self._embed_tokens().weight
        return w.dtype, w.device

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.llm.gradient_checkpointing_enable(**kwargs)

    # ---------------------------------------------------------------------------------------------------
    # slide tokens

    def encode_slides(self, features: Sequence[Tensor],
                      coords: Optional[Sequence[Optional[Tensor]]] = None) -> List[Tensor]:
        """Per-slide visual tokens [Ni, H] in the LLM's dtype/device (slides padded to one encoder batch)."""
        if len(features) == 0:
            return []
        enc_w = next(self.LongNet_encoder.parameters())
        dev, dt = enc_w.device, enc_w.dtype
        d = self.config.feature_dim
        lens = []
        for i, f in enumerate(features):
            if f.dim() != 2 or f.shape[1] != d or f.shape[0] == 0:
                raise SlideChatError(f"slide {i}: expected features [N>0, {d}], got {tuple(f.shape)}")
            lens.append(int(f.shape[0]))
        b, n = len(features), max(lens)
        x = torch.zeros(b, n, d, dtype=dt, device=dev)
        pad = torch.ones(b, n, dtype=torch.bool, device=dev)
        for i, f in enumerate(features):
            x[i, : lens[i]] = f.to(device=dev, dtype=dt)
            pad[i, : lens[i]] = False
        c = None
        if coords is not None and any(cc is not None for cc in coords):
            if len(coords) != b or any(cc is None for cc in coords):
                logger.warning("coords given for only some slides; encoding the batch without coords")
            else:
                c = torch.zeros(b, n, 2, dtype=torch.float32, device=dev)
                for i, cc in enumerate(coords):
                    if cc.shape != (lens[i], 2):
                        raise SlideChatError(f"slide {i}: coords shape {tuple(cc.shape)} != {(lens[i], 2)}")
                    c[i, : lens[i]] = cc.to(device=dev, dtype=torch.float32)
        y = self.LongNet_encoder(self.input_proj(x), pad if pad.any() else None, c)
        proj_w = self.projector.model[0].weight
        y = self.projector(y.to(proj_w.dtype))
        llm_dt, llm_dev = self._llm_dtype_device()
        y = y.to(device=llm_dev, dtype=llm_dt)
        return [y[i, : lens[i]] for i in range(b)]

    @staticmethod
    def _placeholder_index(ids: Tensor, row: int) -> int:
        pos = (ids == IMAGE_TOKEN_INDEX).nonzero(as_tuple=True)[0]
        if pos.numel() != 1:
            raise SlideChatError(f"row {row} of input_ids has {pos.numel()} slide placeholders "
                                 f"(token {IMAGE_TOKEN_INDEX}); exactly one is required")
        return int(pos.item())

    # ---------------------------------------------------------------------------------------------------
    # training / scoring

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                features: Optional[Sequence[Tensor]] = None, coords: Optional[Sequence[Optional[Tensor]]] = None,
                labels: Optional[Tensor] = None, full_logits: bool = False, **llm_kwargs: Any):
        """Splice each row's visual tokens in at its placeholder, right-pad, run the LLM (loss if labels).

        With labels, the LM head runs only at positions that carry a label (``label_logits``; the loss
        equals the stock ``llm(..., labels=...)`` one up to float32 summation order) and the output has
        ``logits=None``: full-vocabulary logits for every visual token were most of a step's memory and
        time. ``full_logits=True`` (or an LLM that path does not know) makes the stock call instead.
        """
        if input_ids.dim() != 2:
            raise SlideChatError(f"input_ids must be [B, L], got {tuple(input_ids.shape)}")
        if features is None or len(features) != input_ids.shape[0]:
            raise SlideChatError(f"need one feature tensor per row: {input_ids.shape[0]} rows, "
                                 f"{0 if features is None else len(features)} slides")
        b, _ = input_ids.shape
        places = [self._placeholder_index(input_ids[i], i) for i in range(b)]
        vis = self.encode_slides(features, coords)
        llm_dt, dev = self._llm_dtype_device()
        input_ids = input_ids.to(dev)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(dev)
        text = self._embed_tokens()(input_ids.masked_fill(input_ids == IMAGE_TOKEN_INDEX, 0))
        rows, masks, labs = [], [], []
        for i in range(b):
            p, v = places[i], vis[i]
            ones = torch.ones(v.shape[0], dtype=attention_mask.dtype, device=dev)
            rows.append(torch.cat([text[i, :p], v.to(text.dtype), text[i, p + 1:]]))
            masks.append(torch.cat([attention_mask[i, :p], ones, attention_mask[i, p + 1:]]))
            if labels is not None:
                lab = labels[i].to(dev)
                ign = torch.full((v.shape[0],), IGNORE_INDEX, dtype=lab.dtype, device=dev)
                labs.append(torch.cat([lab[:p], ign, lab[p + 1:]]))
        new_len = max(r.shape[0] for r in rows)
        emb = text.new_zeros(b, new_len, text.shape[-1])
        mask = attention_mask.new_zeros(b, new_len)
        lab_t = None if labels is None else torch.full((b, new_len), IGNORE_INDEX, dtype=labels.dtype, device=dev)
        for i in range(b):
            n = rows[i].shape[0]
            emb[i, :n] = rows[i]
            mask[i, :n] = masks[i]
            if lab_t is not None:
                lab_t[i, :n] = labs[i]
        llm_kwargs.setdefault("use_cache", False)
        if lab_t is not None and not full_logits and llm_kwargs.get("return_dict", True):
            parts = causal_lm_parts(self.llm)
            if parts is not None:
                return self._loss_at_labels(parts, emb, mask, lab_t, llm_kwargs)
        return self.llm(inputs_embeds=emb, attention_mask=mask, labels=lab_t, **llm_kwargs)

    @staticmethod
    def _loss_at_labels(parts: Any, emb: Tensor, mask: Tensor, labels: Tensor,
                        llm_kwargs: Dict[str, Any]) -> Any:
        """What ``...ForCausalLM.forward`` does with labels, the head applied at labelled positions only
        (``num_items_in_batch`` goes to the loss, every other keyword to the decoder, as there)."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        decoder, head = parts
        kwargs = dict(llm_kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs["return_dict"] = True
        out = decoder(inputs_embeds=emb, attention_mask=mask, **kwargs)
        loss = loss_at_labels(out.last_hidden_state, head, labels, num_items_in_batch=num_items)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)

    # ---------------------------------------------------------------------------------------------------
    # generation

    def default_eos_token_ids(self) -> List[int]:
        """Stop tokens: the LLM's generation/model config eos plus the tokenizer's eos and ``<|im_end|>``."""
        ids: List[int] = []

        def add(x: Any) -> None:
            if x is None:
                return
            for t in (x if isinstance(x, (list, tuple)) else [x]):
                if t is not None and int(t) not in ids and int(t) >= 0:
                    ids.append(int(t))

        add(getattr(getattr(self.llm, "generation_config", None), "eos_token_id", None))
        add(getattr(getattr(self.llm, "config", None), "eos_token_id", None))
        tok = self.tokenizer
        if tok is not None:
            add(tok.eos_token_id)
            im_end = tok.convert_tokens_to_ids("<|im_end|>")
            if im_end is not None and im_end != tok.unk_token_id:
                add(im_end)
        return ids

    def _default_pad_id(self, eos: List[int]) -> int:
        for src in (getattr(self.llm, "generation_config", None), getattr(self.llm, "config", None),
                    self.tokenizer):
            pid = getattr(src, "pad_token_id", None)
            if pid is not None:
                return int(pid)
        return eos[0] if eos else 0

    @torch.no_grad()
    def generate(self, input_ids: Sequence[Tensor], features: Sequence[Tensor],
                 coords: Optional[Sequence[Optional[Tensor]]] = None, max_new_tokens: int = 500,
                 do_sample: bool = False, eos_token_id: Optional[Union[int, List[int]]] = None,
                 pad_token_id: Optional[int] = None,
                 visual_tokens: Optional[Sequence[Tensor]] = None, **gen_kwargs: Any) -> List[Tensor]:
        """Answer a batch of prompts; returns each sample's new tokens, cut before the first stop token.

        ``visual_tokens`` (``encode_slides`` output) replaces ``features`` when the same slides are
        asked again, e.g. the turns of a chat, so the slide is encoded once.
        """
        if visual_tokens is not None:
            features = visual_tokens
        if len(input_ids) != len(features):
            raise SlideChatError(f"{len(input_ids)} prompts but {len(features)} slides")
        if len(input_ids) == 0:
            return []
        places = [self._placeholder_index(ids.reshape(-1), i) for i, ids in enumerate(input_ids)]
        vis = list(visual_tokens) if visual_tokens is not None else self.encode_slides(features, coords)
        rows = self.prompt_embeddings(input_ids, vis, places)
        # left padding (an empty shared prefix): every prompt ends where generation starts
        emb, mask = middle_padded(rows[0][:0], rows, 0)
        eos = self._generation_defaults(do_sample, eos_token_id, pad_token_id, gen_kwargs)
        out = self.llm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=max_new_tokens,
                                **gen_kwargs)
        if out.shape[1] > max_new_tokens:  # a model that echoed prompt ids (not the case for embeds-only)
            out = out[:, -max_new_tokens:]
        return [self._cut_at_stop(seq, eos) for seq in out]

    # ---------------------------------------------------------------------------------------------------
    # checkpoints

    def slide_state_dict(self) -> Dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(SLIDE_PREFIXES)}

    def required_keys(self, llm: bool = False) -> List[str]:
        """Keys a SlideChat checkpoint must hold: the slide modules (less the parameters our encoder adds
        on top of the released layout) and, with ``llm``, the LLM's weights (its LoRA tensors when wrapped
        by peft, else every ``llm.*`` key)."""
        own = list(self.state_dict())
        keys = [k for k in own if k.startswith(SLIDE_PREFIXES) and not k.startswith(OPTIONAL_SLIDE_KEYS)]
        if llm:
            lora = [k for k in own if k.startswith("llm.") and "lora_" in k]
            keys += lora or [k for k in own if k.startswith("llm.")]
        return keys

    def map_checkpoint_keys(self, state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Released / peft / our key names -> this model's names (``llm.model.*`` onto a peft-wrapped LLM
        and back). Keys with no counterpart keep their name, so the key check reports them."""
        own = self.state_dict()
        lookup: Dict[str, str] = {}
        for k in own:
            lookup[k] = k
            if k.startswith("llm.") and "lora_" not in k:
                lookup.setdefault(_canonical_llm_key(k), k)
        mapped: Dict[str, Tensor] = {}
        for k, v in state_dict.items():
            target = lookup.get(k) or (lookup.get(_canonical_llm_key(k)) if k.startswith("llm.") else None)
            mapped[target or k] = v
        return mapped

    def load_slidechat_state_dict(self, state_dict: Mapping[str, Tensor], strict_llm: bool = False, *,
                                  required: Optional[Sequence[str]] = None, allow_partial: bool = False,
                                  source: Union[str, PathLike] = "") -> KeyReport:
        """Load a released or slidechat checkpoint dict through ``checkpoint.load_checked``.

        ``required`` defaults to :meth:`required_keys` (``llm=strict_llm``): a checkpoint without the slide
        modules, or with a shape mismatch, is a one-line error; absent ``llm.*`` keys are kept as loaded
        from the LLM folder unless ``strict_llm``. ``allow_partial`` turns missing/unexpected keys into
        a warning (shape mismatches stay errors).
        """
        req = list(required) if required is not None else self.required_keys(llm=strict_llm)
        return load_checked(self, self.map_checkpoint_keys(state_dict), required=req,
                            allow_partial=allow_partial, source=source)

    def load_checkpoint(self, path: PathLike, strict_llm: bool = False, allow_partial: bool = False,
                        allow_unsafe_pickle: bool = False) -> KeyReport:
        """``load_slidechat_state_dict`` of a checkpoint file/folder/work dir (``checkpoint.load_weights``)."""
        sd = load_weights(path, allow_unsafe_pickle=allow_unsafe_pickle)
        return self.load_slidechat_state_dict(sd, strict_llm=strict_llm, allow_partial=allow_partial,
                                              source=path)

    def save_pretrained(self, folder: PathLike, tokenizer: Any = None, overwrite: bool = False) -> Path:
        """Write a self-contained folder: ``llm/`` (+ tokenizer), slide modules, config.

        The whole folder is written beside ``folder`` and swapped in at the end
        (``utils.outputs.staged_folder``): a crash leaves the previous export as it was, never a mix
        of a new ``llm/`` and old slide modules. A non-empty folder that is not an export of ours is
        refused unless ``overwrite`` (the user's other files there are kept). A peft-wrapped LLM is
        merged first (in place: afterwards ``self.llm`` is the merged model).
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        check_output_folder(folder, EXPORT_KIND, overwrite=overwrite, legacy=legacy_export_entries)
        if _is_peft(self.llm):
            logger.warning("merging LoRA adapters into the LLM before saving")
            self.llm = self.llm.merge_and_unload()
        with staged_folder(folder, EXPORT_KIND, overwrite=overwrite, legacy=legacy_export_entries) as tmp:
            self.llm.save_pretrained(tmp / LLM_DIR, safe_serialization=True)
            tok = tokenizer if tokenizer is not None else self.tokenizer
            if tok is not None:
                tok.save_pretrained(tmp / LLM_DIR)
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.slide_state_dict().items()}
            save_file(tensors, str(tmp / SLIDE_MODULES_FILE),
                      metadata={"format": "pt", "slidechat_format": str(FORMAT_VERSION)})
            meta = {"format_version": FORMAT_VERSION, "llm_hidden_size": self._llm_hidden_size(),
                    **self.config.to_dict()}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        logger.info("saved SlideChat model to %s", folder)
        return folder

    @classmethod
    def from_pretrained(cls, folder: PathLike, torch_dtype: Optional[torch.dtype] = None,
                        device_map: Any = None, load_tokenizer: bool = True, *,
                        trust_remote_code: bool = False, allow_partial: bool = False) -> "SlideChatModel":
        """Load a folder written by ``save_pretrained`` (the LLM through :mod:`slidechat.model.hf_folder`:
        no folder code unless ``trust_remote_code``, no missing LLM weights unless ``allow_partial``)."""
        from transformers import AutoModelForCausalLM

        folder = Path(folder)
        cfg_path = folder / CONFIG_FILE
        if not cfg_path.is_file():
            raise SlideChatError(f"not a SlideChat model folder (no {CONFIG_FILE})", path=folder)
        try:
            meta = json.loads(cfg_path.read_text(encoding="utf-8"))
            meta["encoder"] = saved_encoder_dict(meta.get("encoder", {}))  # no key: trained masked
            config = SlideChatConfig.from_dict(meta)
        except (ValueError, TypeError) as exc:
            raise SlideChatError(f"invalid config: {exc}", path=cfg_path) from exc
        llm_dir = folder / LLM_DIR
        if not (llm_dir / "config.json").is_file():
            raise SlideChatError("LLM folder missing or incomplete", path=llm_dir)
        kwargs: Dict[str, Any] = {}
        if torch_dtype is not None:
            kwargs["torch_dtype"] = torch_dtype
        if device_map is not None:
            kwargs["device_map"] = device_map
        llm = load_model(AutoModelForCausalLM, llm_dir, trust_remote_code=trust_remote_code,
                         allow_partial=allow_partial, **kwargs)
        tok = None
        if load_tokenizer and ((llm_dir / "tokenizer.json").is_file() or (llm_dir / "tokenizer_config.json").is_file()):
            tok = hf_load_tokenizer(llm_dir, trust_remote_code=trust_remote_code)
        model = cls(llm, config, tokenizer=tok)
        slide_file = folder / SLIDE_MODULES_FILE
        if not slide_file.is_file():
            raise SlideChatError(f"missing {SLIDE_MODULES_FILE}", path=folder)
        sd = load_weights(slide_file)
        if any(not k.startswith(SLIDE_PREFIXES) for k in sd):
            raise SlideChatError("slide module file holds non-slide keys", path=slide_file)
        model.load_slidechat_state_dict(sd, source=slide_file)
        _, dev = model._llm_dtype_device()
        dt = torch_dtype if torch_dtype is not None else next(iter(sd.values())).dtype
        for name in SLIDE_PREFIXES:
            getattr(model, name.rstrip(".")).to(device=dev, dtype=dt)
        model.eval()
        return model

    # ---------------------------------------------------------------------------------------------------
    # one prefill per slide (issue 14): the questions of one slide share the prefill of their common prefix

    def prompt_embeddings(self, input_ids: Sequence[Tensor], visual_tokens: Sequence[Tensor],
                          places: Optional[Sequence[int]] = None) -> List[Tensor]:
        """Each prompt's input embeddings ``[L_i, H]``: its text tokens with its slide's visual tokens
        spliced in at its placeholder (``places``: the placeholders' indices, when already found)."""
        _, dev = self._llm_dtype_device()
        embed = self._embed_tokens()
        rows = []
        for i, ids in enumerate(input_ids):
            ids = ids.reshape(-1).to(dev)
            p = self._placeholder_index(ids, i) if places is None else places[i]
            t = embed(ids.masked_fill(ids == IMAGE_TOKEN_INDEX, 0))
            rows.append(torch.cat([t[:p], visual_tokens[i].to(t.dtype), t[p + 1:]]))
        return rows

    @staticmethod
    def _positions_of(ids: Sequence[int], n: int, n_visual: int) -> int:
        """Sequence positions of the first ``n`` prompt ids (the placeholder stands for the slide)."""
        return n + (n_visual - 1 if IMAGE_TOKEN_INDEX in ids[:n] else 0)

    def _generation_defaults(self, do_sample: bool, eos_token_id: Any, pad_token_id: Optional[int],
                             gen_kwargs: Dict[str, Any]) -> List[int]:
        """Fill ``gen_kwargs`` as :meth:`generate` does (stop and pad ids, greedy without sampling knobs);
        returns the stop ids."""
        eos = self.default_eos_token_ids() if eos_token_id is None else (
            list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [int(eos_token_id)])
        gen_kwargs.update(do_sample=do_sample, eos_token_id=eos or None,
                          pad_token_id=self._default_pad_id(eos) if pad_token_id is None else int(pad_token_id))
        if not do_sample:
            for k in ("temperature", "top_p", "top_k"):
                gen_kwargs.setdefault(k, None)
        return eos

    @staticmethod
    def _cut_at_stop(seq: Tensor, eos: List[int]) -> Tensor:
        if eos:
            hits = torch.isin(seq, torch.tensor(eos, device=seq.device)).nonzero(as_tuple=True)[0]
            if hits.numel():
                seq = seq[: int(hits[0])]
        return seq.detach().cpu()

    @torch.no_grad()
    def generate_shared(self, input_ids: Sequence[Tensor], visual_tokens: Tensor, *, max_batch: int = 8,
                        state: Optional[PrefixCache] = None, keep: bool = False, max_new_tokens: int = 500,
                        do_sample: bool = False,
                        eos_token_id: Optional[Union[int, List[int]]] = None, pad_token_id: Optional[int] = None,
                        **gen_kwargs: Any) -> Tuple[List[Tensor], Optional[PrefixCache]]:
        """Answer several prompts about ONE slide (``visual_tokens``, :meth:`encode_slides` of it) with one
        prefill of their longest common token prefix, ``max_batch`` rows per ``generate`` from a fork of
        its cache (:mod:`slidechat.model.prefix_cache`); the answers are :meth:`generate`'s.

        ``keep`` (one prompt: a chat turn) returns the cache, holding the prompt and its answer, for the
        next turn; ``state`` is the one the previous turn kept: it is cropped to what this prompt shares
        with it and extended to the prompt, so a turn prefills only its own new tokens.
        Returns each prompt's new tokens (cut before the first stop token) and the kept cache (or None).
        """
        rows = [ids.reshape(-1).tolist() for ids in input_ids]
        if not rows:
            return [], state
        eos = self._generation_defaults(do_sample, eos_token_id, pad_token_id, gen_kwargs)
        gen_kwargs["max_new_tokens"] = max_new_tokens
        n_vis = int(visual_tokens.shape[0])
        embeds = self.prompt_embeddings(input_ids, [visual_tokens] * len(rows))
        if (keep or state is not None) and len(rows) != 1:
            raise SlideChatError(f"a kept prefix cache continues one prompt, not {len(rows)}")
        shared = common_prefix_len(rows)
        if state is None and shared == 0 and not keep:  # nothing in common: today's batched path
            return self.generate(input_ids, [visual_tokens] * len(rows), visual_tokens=[visual_tokens] * len(rows),
                                 **gen_kwargs), None
        start = 0
        if state is not None:  # keep what the previous turn computed and this prompt still reads
            start = shared_len(state.ids, rows[0])
            crop_cache(state.cache, self._positions_of(rows[0], start, n_vis))
        p_pos = self._positions_of(rows[0], shared, n_vis)
        s_pos = self._positions_of(rows[0], start, n_vis)
        cache = state.cache if state is not None else None
        if p_pos > s_pos or cache is None:
            cache = prefill(self.llm, cache, inputs_embeds=embeds[0][s_pos:p_pos][None])
        prefix = embeds[0][:p_pos]
        results: List[Tensor] = []
        new = None
        for lo in range(0, len(rows), max(1, int(max_batch))):
            chunk = embeds[lo:lo + max_batch]
            new = generate_from_prefix(self.llm, cache, prefix, [e[p_pos:] for e in chunk], embeds=True,
                                       fork=not keep, **gen_kwargs)
            results += [self._cut_at_stop(new[i], eos) for i in range(len(chunk))]
        if not keep:
            return results, None
        held = rows[0] + new[0].tolist()
        n_held = cache.get_seq_length() - (n_vis - 1 if IMAGE_TOKEN_INDEX in rows[0] else 0)
        return results, PrefixCache(cache, held[:n_held])

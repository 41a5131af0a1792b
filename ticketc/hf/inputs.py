"""Default example inputs of a transformers model, as plain data the exporter can consume.

optimum's ONNX export configs are the field's table of per-architecture inputs, but
optimum-onnx (where they live since optimum 2) requires transformers < 4.58, so ticketc keeps
this small table. What it knows, it takes from the library rather than from names: the model
class's `main_input_name` says which kind of input the model takes, its forward signature
whether it takes an attention mask, the config the sizes (vocabulary, image size, channels).

| main input       | inputs (dynamic axes)                                              |
|------------------|--------------------------------------------------------------------|
| input_ids        | input_ids, attention_mask: int64 [batch, sequence]; pixel_values   |
|                  | too where the forward takes it (a dual encoder: CLIP, SigLIP)      |
| pixel_values     | pixel_values: float [batch, channels, height, width]               |
| input_features   | Whisper: float [batch, mel bins, 2 x max_source_positions]         |
| input_values     | float [batch, sequence] (wav2vec2-style audio, traced at 4000)     |

Encoder-decoder models (config.is_encoder_decoder) also get decoder_input_ids int64
[batch, decoder_sequence].
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from ticketc.errors import UserError
from ticketc.inputs import end_rows_with_, pad_masks_

__all__ = [
    "BATCH",
    "SEQUENCE",
    "HfInput",
    "default_input_specs",
    "example_inputs",
    "sample_inputs",
]

BATCH = "batch"
SEQUENCE = "sequence"
_EXAMPLE_BATCH = 2
_EXAMPLE_SEQUENCE = 16


@dataclass(frozen=True)
class HfInput:
    """One named model input: example shape, dtype, and which axes may vary.

    `dtype`: a torch dtype name ("int64", "float32"). `dynamic_axes`: axis -> symbolic name
    (BATCH, SEQUENCE, ...), as torch.onnx's dynamic axes. `high`: integer inputs hold values in
    [0, high) (token ids); None with an integer dtype means all ones (attention masks).
    `final`: a token every row ends with and holds nowhere else (the end-of-sequence token
    a BART classification head looks for), None for none.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    dynamic_axes: dict[int, str] = field(default_factory=dict)
    high: int | None = None
    final: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"HfInput {self.name!r}: {self.dtype!r} is not a torch dtype")
        if any(int(s) <= 0 for s in self.shape):
            raise ValueError(f"HfInput {self.name!r}: shape {self.shape} must be positive")

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype)
        assert isinstance(dtype, torch.dtype)
        return dtype

    def example(self, generator: torch.Generator) -> torch.Tensor:
        if self.torch_dtype.is_floating_point:
            return torch.randn(self.shape, generator=generator).to(self.torch_dtype)
        if self.high is None:
            return torch.ones(self.shape, dtype=self.torch_dtype)
        ids = torch.randint(0, self.high, self.shape, generator=generator, dtype=self.torch_dtype)
        return end_rows_with_(ids, self.final, self.high) if self.final is not None else ids

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "dynamic_axes": {str(k): v for k, v in self.dynamic_axes.items()},
            "high": self.high,
            "final": self.final,
        }


def example_inputs(specs: list[HfInput], seed: int = 0) -> dict[str, torch.Tensor]:
    """One example tensor per spec (deterministic for a seed), keyed by input name."""
    generator = torch.Generator().manual_seed(seed)
    return {spec.name: spec.example(generator) for spec in specs}


def sample_inputs(specs: list[HfInput], seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs to verify an export on: other sizes than the example on every dynamic axis
    (batch 3, other axes about 2/3 of the example's) and, in integer inputs that are all ones
    (attention masks), padding: right in the first row, left in the second (`pad_masks_`)."""
    resized = []
    for spec in specs:
        shape = tuple(
            (3 if axis == 0 else max(2, (2 * size) // 3)) if axis in spec.dynamic_axes else size
            for axis, size in enumerate(spec.shape)
        )
        resized.append(dataclasses.replace(spec, shape=shape))
    out = example_inputs(resized, seed)
    for spec in resized:
        if not spec.torch_dtype.is_floating_point and spec.high is None and len(spec.shape) == 2:
            pad_masks_(out[spec.name])
    return out


def _derives_decoder_inputs(model: torch.nn.Module, config: Any) -> bool:
    """Whether an encoder-decoder's head makes its decoder inputs from input_ids itself."""
    encoder_decoder = getattr(config, "is_encoder_decoder", False)
    return encoder_decoder and type(model).__name__.endswith(_DECODER_FROM_INPUT)


def _get(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _float_dtype(model: torch.nn.Module) -> str:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return "float32"


def _takes(model: torch.nn.Module, argument: str) -> bool:
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


#: Heads of encoder-decoder models that build decoder_input_ids from input_ids themselves
_DECODER_FROM_INPUT = ("ForSequenceClassification", "ForQuestionAnswering")


def _pixels(model: torch.nn.Module, config: Any) -> HfInput:
    """pixel_values at the config's image_size and num_channels (3 if it gives none), with
    a dynamic batch; UserError saying which --input to give where it has no image_size."""
    size = _get(config, "image_size")
    channels = _get(config, "num_channels") or 3
    if size is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise UserError(
            f"{model_type} config has no image_size for pixel_values: pass --input "
            f"pixel_values:{_float_dtype(model)}:1,{int(channels)},HEIGHT,WIDTH"
        )
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    pixels = (_EXAMPLE_BATCH, int(channels), h, w)
    return HfInput("pixel_values", _float_dtype(model), pixels, {0: BATCH})


def default_input_specs(model: torch.nn.Module) -> list[HfInput]:
    """The inputs a transformers `model` is traced with by default; see the module table.

    Raises UserError when the model's main input is not one the table knows (pass the inputs
    explicitly then).
    """
    config: Any = getattr(model, "config", None)
    if config is None:
        raise UserError(f"{type(model).__name__} has no transformers config")
    main = getattr(model, "main_input_name", None)
    model_type = getattr(config, "model_type", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    batch = {0: BATCH}
    specs: list[HfInput]
    if main == "input_ids":
        positions = _get(text, "max_position_embeddings", "n_positions", "n_ctx")
        length = min(_EXAMPLE_SEQUENCE, int(positions)) if positions else _EXAMPLE_SEQUENCE
        vocab = _get(text, "vocab_size")
        if vocab is None:
            raise UserError(f"{model_type} config has no vocab_size to draw token ids from")
        axes = {0: BATCH, 1: SEQUENCE}
        # a classification head of an encoder-decoder reads the states at each row's
        # end-of-sequence token, and refuses rows without one
        final = _get(text, "eos_token_id") if _derives_decoder_inputs(model, config) else None
        specs = [HfInput("input_ids", "int64", (_EXAMPLE_BATCH, length), axes, int(vocab), final)]
        if _takes(model, "attention_mask"):
            specs.append(HfInput("attention_mask", "int64", (_EXAMPLE_BATCH, length), axes))
        if _takes(model, "pixel_values"):  # a dual encoder (CLIP, SigLIP) needs both towers
            vision = getattr(config, "vision_config", None)
            specs.append(_pixels(model, vision if vision is not None else config))
    elif main == "pixel_values":
        specs = [_pixels(model, config)]
    elif main == "input_features" and model_type == "whisper":
        frames = 2 * int(config.max_source_positions)  # the conv stem halves the frames
        features = (_EXAMPLE_BATCH, int(config.num_mel_bins), frames)
        specs = [HfInput("input_features", _float_dtype(model), features, batch)]
    elif main == "input_values":
        # torch.export keeps the length dynamic through the conv stem's strides (Dim.AUTO)
        audio = (_EXAMPLE_BATCH, 4000)
        specs = [HfInput("input_values", _float_dtype(model), audio, {0: BATCH, 1: SEQUENCE})]
    else:
        raise UserError(
            f"no default inputs for model_type {model_type!r} (main input {main!r}); "
            f"give them with --input {main or 'NAME'}:DTYPE:SHAPE"
        )
    # a sequence-classification or question-answering head of an encoder-decoder (BART, T5)
    # reads the decoder's states at the positions of the encoder's tokens: it makes its
    # decoder inputs from input_ids itself, at their length, and gets none here
    encoder_decoder = getattr(config, "is_encoder_decoder", False)
    if encoder_decoder and _takes(model, "decoder_input_ids"):
        if _derives_decoder_inputs(model, config):
            return specs
        vocab = _get(text, "vocab_size") or 2
        axes = {0: BATCH, 1: "decoder_sequence"}
        specs.append(HfInput("decoder_input_ids", "int64", (_EXAMPLE_BATCH, 4), axes, int(vocab)))
    return specs

"""The lesson's layers written out, drop-in twins of torch.nn's: Linear, Embedding, Flatten, Tanh, ReLU,
Sequential; and FlattenConsecutive and Positionwise (the wavenet's steps, which torch does not have).

Constructor signatures, parameter names and shapes, reprs and state-dict keys are torch 2.13's; normlab's own
options (`init`, `nonlinearity`, `generator`) are keyword-only and come last.
"""

import math
import operator
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import nn
from torch.types import Device

from normlab.nn import init as initializers

_SCHEME_BIAS = {"torch": "uniform", "naive": "normal"}  # a scheme's own bias; the others start the bias at 0


class Linear(nn.Module):
    """y = x Wᵀ + b for input (*, in_features) → (*, out_features), equal to torch.nn.Linear.

    `weight` is (out_features, in_features), `bias` (out_features,). `init` (one of
    `normlab.nn.init.INIT_SCHEMES`) picks how the weight is drawn, all from `generator` when one is given
    (else the global generator), weight first, then the bias:

    - "torch": torch's default, bit for bit: kaiming_uniform_(a=√5), i.e. U(±1/√in_features); bias
      U(±1/√in_features).
    - "naive": weight and bias N(0, 1), the lesson's unscaled torch.randn, which saturates tanh.
    - "fan_in": N(0, 1/in_features); "kaiming": kaiming_normal_(mode="fan_in", nonlinearity=nonlinearity),
      std = gain/√in_features; "xavier": xavier_normal_(gain=calculate_gain(nonlinearity)); bias 0 for these.

    `bias_init` overrides the scheme's bias: "uniform" (torch's U(±1/√in_features)), "normal" (N(0, 1), the
    lesson's) or "zeros". Then the weight is multiplied by `weight_scale` and the bias by `bias_scale` (a scale
    of 0 gives +0.0 everywhere, after the draw, so the draws that follow are unchanged).
    """

    in_features: int
    out_features: int

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Device = None,
                 dtype: torch.dtype | None = None, *, init: str = "torch", nonlinearity: str = "tanh",
                 bias_init: str | None = None, weight_scale: float = 1.0, bias_scale: float = 1.0,
                 generator: torch.Generator | None = None) -> None:
        if init not in initializers.INIT_SCHEMES:
            raise ValueError(f"unknown Linear init {init!r}: use one of {', '.join(initializers.INIT_SCHEMES)}")
        if bias_init is not None and bias_init not in initializers.BIAS_INITS:
            raise ValueError(f"unknown Linear bias_init {bias_init!r}: use one of "
                             f"{', '.join(initializers.BIAS_INITS)} (or None for the scheme's own)")
        initializers.calculate_gain(nonlinearity)  # reject an unknown nonlinearity before building anything
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.init = init
        self.nonlinearity = nonlinearity
        self.bias_init = bias_init or _SCHEME_BIAS.get(init, "zeros")
        self.weight_scale = weight_scale
        self.bias_scale = bias_scale
        self.weight = nn.Parameter(torch.empty((out_features, in_features), device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw weight then bias again following `init` and `bias_init`, from `generator` when given; scale. On
        torch's meta device (shapes only) there is nothing to draw."""
        weight = self.weight
        if weight.is_meta:  # and the first random draw there costs a second of torch's set-up
            return
        if self.init == "torch":
            initializers.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        elif self.init in ("kaiming", "fan_in"):
            nonlinearity = self.nonlinearity if self.init == "kaiming" else "linear"
            initializers.kaiming_normal_(weight, mode="fan_in", nonlinearity=nonlinearity, generator=generator)
        elif self.init == "xavier":
            gain = initializers.calculate_gain(self.nonlinearity)
            initializers.xavier_normal_(weight, gain=gain, generator=generator)
        else:
            with torch.no_grad():
                weight.normal_(0.0, 1.0, generator=generator)
        with torch.no_grad():
            if self.weight_scale != 1.0:
                weight.mul_(self.weight_scale)
            if self.bias is None:
                return
            if self.bias_init == "uniform":
                fan_in, _ = initializers.fan_in_and_fan_out(weight)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                self.bias.uniform_(-bound, bound, generator=generator)
            elif self.bias_init == "normal":
                self.bias.normal_(0.0, 1.0, generator=generator)
            else:
                self.bias.zero_()
            if self.bias_scale == 0.0:
                self.bias.zero_()  # as the lesson's `randn(...) * 0`, but +0.0 everywhere
            elif self.bias_scale != 1.0:
                self.bias.mul_(self.bias_scale)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """(*, in_features) → (*, out_features)."""
        output = input @ self.weight.T
        if self.bias is not None:
            output = output + self.bias
        return output

    def extra_repr(self) -> str:
        """torch's description, plus the init scheme when it is not torch's default."""
        text = (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")
        if self.init != "torch":
            text += f", init={self.init!r}"
            if self.init in ("kaiming", "xavier"):
                text += f", nonlinearity={self.nonlinearity!r}"
        if self.bias is not None and self.bias_init != _SCHEME_BIAS.get(self.init, "zeros"):
            text += f", bias_init={self.bias_init!r}"
        for name in ("weight_scale", "bias_scale"):
            if getattr(self, name) != 1.0:
                text += f", {name}={getattr(self, name)!r}"
        return text


class Embedding(nn.Module):
    """A lookup table: integer indices (*) → rows of `weight` (*, embedding_dim), equal to torch.nn.Embedding.

    `weight` is (num_embeddings, embedding_dim), drawn from N(0, 1) (from `generator` when given). The row at
    `padding_idx` starts at zero and receives no gradient. `max_norm`, `scale_grad_by_freq` and `sparse` are
    not implemented and raise NotImplementedError rather than being silently ignored.
    """

    num_embeddings: int
    embedding_dim: int
    padding_idx: int | None

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: torch.Tensor | None = None, _freeze: bool = False,
                 device: Device = None, dtype: torch.dtype | None = None, *,
                 generator: torch.Generator | None = None) -> None:
        unsupported = {"max_norm": max_norm is not None, "scale_grad_by_freq": scale_grad_by_freq,
                       "sparse": sparse}
        for name, requested in unsupported.items():
            if requested:
                raise NotImplementedError(
                    f"normlab.nn.Embedding does not implement {name}; leave it at its default or use "
                    "torch.nn.Embedding"
                )
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise AssertionError(
                    f"Padding_idx must be within num_embeddings: got padding_idx={padding_idx} for "
                    f"num_embeddings={num_embeddings}"
                )
            padding_idx %= num_embeddings  # a negative index counts from the end, as in torch
        self.padding_idx = padding_idx
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.scale_grad_by_freq = scale_grad_by_freq
        self.sparse = sparse
        if _weight is None:
            weight = torch.empty((num_embeddings, embedding_dim), device=device, dtype=dtype)
            self.weight = nn.Parameter(weight, requires_grad=not _freeze)
            self.reset_parameters(generator)
        else:
            if list(_weight.shape) != [num_embeddings, embedding_dim]:
                raise AssertionError(
                    f"Shape of weight does not match num_embeddings and embedding_dim: got "
                    f"{list(_weight.shape)}, expected {[num_embeddings, embedding_dim]}"
                )
            self.weight = nn.Parameter(_weight, requires_grad=not _freeze)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw the table from N(0, 1) again (from `generator` when given); zero the padding row. On torch's meta
        device (shapes only) there is nothing to draw."""
        if self.weight.is_meta:
            return
        with torch.no_grad():
            self.weight.normal_(0.0, 1.0, generator=generator)
            if self.padding_idx is not None:
                self.weight[self.padding_idx].fill_(0)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Look up int64/int32 indices in [0, num_embeddings): (*) → (*, embedding_dim)."""
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"Embedding takes a tensor of indices, not {type(input).__name__}: wrap it in "
                            "torch.tensor")
        if input.dtype not in (torch.int64, torch.int32):
            raise RuntimeError(
                f"Expected tensor for argument #1 'indices' to have one of the following scalar types: Long, "
                f"Int; but got {input.dtype} instead: convert the indices with .long()"
            )
        try:  # index_select rejects negative and too large indices itself, with no extra pass over them
            output = self.weight.index_select(0, input.reshape(-1)).view(*input.shape, -1)  # (*, embedding_dim)
        except IndexError:
            raise IndexError(
                f"index out of range in self: indices must lie in [0, {self.num_embeddings}), got values "
                f"from {input.min().item()} to {input.max().item()}"
            ) from None
        if self.padding_idx is None:
            return output
        # the padding row keeps its value but takes no gradient
        return torch.where((input == self.padding_idx).unsqueeze(-1), output.detach(), output)

    def extra_repr(self) -> str:
        """torch's description: sizes, then the options that differ from their defaults."""
        text = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            text += f", padding_idx={self.padding_idx}"
        if self.norm_type != 2:
            text += f", norm_type={self.norm_type}"
        return text


class Flatten(nn.Module):
    """Merge axes start_dim..end_dim into one, equal to torch.nn.Flatten: (B, T, C) → (B, T·C) by default."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim = start_dim
        self.end_dim = end_dim

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Flatten axes start_dim..end_dim of `input`."""
        return input.flatten(self.start_dim, self.end_dim)

    def extra_repr(self) -> str:
        """torch's description: start_dim, end_dim."""
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class FlattenConsecutive(nn.Module):
    """Concatenate every n consecutive positions: (B, T, C) → (B, T/n, C·n), and (B, C·n) when T/n is 1.

    The lesson's wavenet step: position t of the output holds input positions n·t, ..., n·t + n − 1 side by
    side. T must be divisible by n.
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"FlattenConsecutive needs an integer n, got {n!r}")
        if n < 1:
            raise ValueError(f"FlattenConsecutive needs n >= 1 positions per group, got n={n}")
        self.n = n

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """(B, T, C) → (B, T/n, C·n), dropping the T axis when T/n is 1."""
        if input.dim() != 3:
            raise ValueError(
                f"FlattenConsecutive expects (B, T, C) input, got shape {tuple(input.shape)}: apply it to "
                "the embedding output (or a previous FlattenConsecutive) of 3 axes"
            )
        batch, positions, channels = input.shape
        if positions % self.n:
            raise ValueError(
                f"FlattenConsecutive({self.n}) needs the number of positions T divisible by n, got "
                f"T={positions} and n={self.n} (input shape {tuple(input.shape)}): use a block size that is "
                "a multiple of n"
            )
        output = input.reshape(batch, positions // self.n, channels * self.n)
        return output.squeeze(1) if output.shape[1] == 1 else output

    def extra_repr(self) -> str:
        """The group size n."""
        return f"n={self.n}"


class Tanh(nn.Module):
    """tanh(x) elementwise, equal to torch.nn.Tanh; its gradient is 1 − tanh²(x)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """tanh of every element."""
        return torch.tanh(input)


class ReLU(nn.Module):
    """max(x, 0) elementwise, equal to torch.nn.ReLU, including its gradient: 0 at x = 0, NaN passes through.

    `inplace=True` overwrites the input instead of allocating the output.
    """

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Zero every element that is <= 0 (NaN is kept, as torch keeps it)."""
        # masking rather than clamp_min(0): clamp passes gradient 1 at x == 0, torch.relu passes 0
        if self.inplace:
            return input.masked_fill_(input <= 0, 0)
        return torch.where(input <= 0, 0, input)

    def extra_repr(self) -> str:
        """torch's description: inplace=True when set."""
        return "inplace=True" if self.inplace else ""


class Sequential(nn.Module):
    """Apply layers in order, equal to torch.nn.Sequential: state-dict keys "0.weight", "1.bias", ...

    Takes layers as arguments (or one OrderedDict of name → layer). Supports indexing with an int (negative
    counts from the end) or a slice (a new Sequential sharing the layers), iteration, len, append and torch's
    repr.
    """

    def __init__(self, *args: nn.Module) -> None:
        super().__init__()
        if len(args) == 1 and isinstance(args[0], OrderedDict):
            for name, module in args[0].items():
                self.add_module(name, module)
        else:
            for index, module in enumerate(args):
                self.add_module(str(index), module)

    def __getitem__(self, index: int | slice) -> nn.Module:
        if isinstance(index, slice):
            return self.__class__(OrderedDict(list(self._modules.items())[index]))
        size = len(self)
        index = operator.index(index)
        if not -size <= index < size:
            raise IndexError(f"index {index} is out of range for a Sequential of {size} layers")
        return list(self._modules.values())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def append(self, module: nn.Module) -> "Sequential":
        """Add `module` at the end, named by its position; returns self."""
        self.add_module(str(len(self)), module)
        return self

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Feed `input` through every layer in order."""
        for module in self:
            input = module(input)
        return input


class Positionwise(nn.Module):
    """Apply a norm over channels to every position of (B, T, C) input by folding T into the batch.

    For BatchNorm this is the lesson's wavenet BatchNorm (statistics over dims 0 and 1); for GroupNorm it keeps
    positions apart. 2-D input passes straight through.
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.norm(x)
        return self.norm(x.reshape(-1, x.shape[-1])).view(x.shape)  # (B*T, C) → (B, T, C)

"""One error type for bad input, always naming the input and what was expected."""


class InputError(ValueError):
    """Raised for user input the pack cannot use. The message names the input."""

    def __init__(self, input_name: str, problem: str):
        self.input_name = input_name
        super().__init__(f"{input_name}: {problem}")


def require_finite(name, tensor):
    import torch

    if not torch.isfinite(tensor).all():
        raise InputError(name, "contains NaN or infinite values; expected a finite tensor "
                               "(check the upstream node, e.g. a VAE run in fp16 that overflowed)")
    return tensor
